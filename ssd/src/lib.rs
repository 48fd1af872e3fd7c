//! kvloft ssd.
