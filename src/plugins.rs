//! plugins (in progress)
