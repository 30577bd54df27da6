//! The one integration test binary: each module tests one part of the daemon through its
//! public API; `support` holds helpers shared between them.

mod plugins;
mod support;
mod bad_server;
mod cli;
mod e2e;
mod harness;
mod ops;
mod sdk;
