//! The one integration test binary: each module tests one part of the daemon through its
//! public API; `support` and `harness` hold helpers shared between them.

mod attacks;
mod bad_server;
mod cli;
mod completions;
mod e2e;
mod harness;
mod hooks;
mod llm;
mod ops;
mod outbox;
mod plugins;
mod proxy;
mod python_plugin;
mod sdk;
mod server;
mod service;
mod support;
mod unit;
