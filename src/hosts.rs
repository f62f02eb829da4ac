//! hosts (in progress)
