//! optim (in progress)
