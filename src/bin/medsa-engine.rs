//! `medsa-engine`: the command-line front end.
fn main() {}
