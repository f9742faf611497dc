"""Reference system under test: a rate-limiting API on a CRDT token bucket."""
