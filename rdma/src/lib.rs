//! kvloft rdma.
