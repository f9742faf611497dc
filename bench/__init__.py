"""Benchmarks: each module here has `main()`, which measures and prints figures.

Benchmarks report; they do not assert. Run all with `make bench`, or one with
`python -m bench NAME`.
"""
