//! The single integration-test binary; each module exercises one part of agentchatd.

mod server;
