//! The Med-SA additions to SAM: bottleneck adapters, the SD-Trans depth branch, HyP-Adpt.

pub mod adapter;
pub mod depth_branch;
pub mod hyper_adapter;
