from token_bucket.cli import main

main()
