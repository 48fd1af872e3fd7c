//! kvloft engine.
