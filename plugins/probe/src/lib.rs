//! Probe: a test fixture for the daemon's outbound hooks, not an example to deploy.
//!
//! With `before-send = "trap"` its `before-send` panics (a trap in the host's eyes), which is
//! how the tests tell the failure policies apart. With `resend-to`, every `after-send` sends
//! one more message to that handle: the smallest plugin that would feed itself forever, which
//! the host's hop limit must stop. With `fail-start = true` its `start` fails, for a guard
//! that never comes up (the manifest then has to list `lifecycle` too, as the tests do).

use agentchat_plugin_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Config {
    before_send: Option<String>,
    resend_to: Option<String>,
    #[serde(default)]
    fail_start: bool,
}

struct Probe;

impl Plugin for Probe {
    fn start(_info: StartInfo) -> Result<(), PluginError> {
        let config: Config = config::parse()?;
        if config.fail_start {
            return Err(PluginError::Unavailable("probe: failing start as configured".to_string()));
        }
        Ok(())
    }

    fn before_send(_msg: OutboundMessage, _origin: Origin) -> Result<SendDecision, PluginError> {
        let config: Config = config::parse()?;
        if config.before_send.as_deref() == Some("trap") {
            panic!("probe: trapping in before-send as configured");
        }
        Ok(SendDecision::Keep)
    }

    fn after_send(sent: Sent, origin: Origin) {
        let Ok(Config { resend_to: Some(handle), .. }) = config::parse::<Config>() else {
            return;
        };
        let hops = origin.hops.to_string();
        let text = format!("probe: after a send at hop {hops}");
        if let Err(refusal) = messaging::send_text(&handle, &text) {
            let refusal = format!("{refusal:?}");
            log::info("resend refused", &[("key", &sent.message.key), ("refusal", &refusal)]);
        }
    }
}

export_plugin!(Probe);
