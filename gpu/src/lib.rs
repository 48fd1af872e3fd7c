//! kvloft gpu.
