//! collective (in progress)
