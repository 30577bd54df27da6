//! inbox (in progress)
