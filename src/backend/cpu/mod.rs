//! The CPU reference backend (f32): the executable specification of every op.
