//! outbox (in progress)
