//! Training building blocks (issue 4 groundwork): losses with their gradients, AdamW with
//! schedules and gradient clipping, and prompt sampling from masks. The backward passes of the
//! network itself and the `train` command build on these.

mod cases;
pub mod checkpoint;
pub mod config_json;
pub mod data;
mod evaluate;
mod loader;
pub mod loss;
pub mod optim;
pub mod sampler;
pub mod sha256;
mod state;
pub mod step;
pub mod trainer;
