//! kvloft bench.
