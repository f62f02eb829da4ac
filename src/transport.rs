//! transport (in progress)
