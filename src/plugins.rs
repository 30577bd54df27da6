//! Placeholder with the plugin host's interface; replaced by the real host.
#![allow(missing_docs, dead_code)]
use std::path::PathBuf;
use std::time::Duration;

pub struct PluginSpec {
    pub id: String,
    pub path: PathBuf,
    pub config_json: String,
    pub timeout: Duration,
    pub memory_limit_bytes: usize,
}
pub struct PluginHost {
    ids: Vec<String>,
}
#[derive(Debug, thiserror::Error)]
#[error("plugin error")]
pub struct PluginError;
impl PluginHost {
    pub async fn load(
        specs: Vec<PluginSpec>,
        _cache_dir: Option<PathBuf>,
    ) -> Result<PluginHost, PluginError> {
        Ok(Self {
            ids: specs.into_iter().map(|s| s.id).collect(),
        })
    }
    pub async fn on_message(&self, msg: &InboundMessage) -> Vec<Verdict> {
        self.ids
            .iter()
            .map(|id| Verdict {
                plugin_id: id.clone(),
                result: Ok(Decision::Reply(vec![Draft {
                    conversation_id: None,
                    text: Some(format!("echo: {}", msg.text.clone().unwrap_or_default())),
                    data_json: None,
                }])),
            })
            .collect()
    }
    pub fn plugin_ids(&self) -> Vec<String> {
        self.ids.clone()
    }
}
pub struct InboundMessage {
    pub id: String,
    pub conversation_id: String,
    pub conversation_kind: ConversationKind,
    pub sender: String,
    pub kind: ContentKind,
    pub text: Option<String>,
    pub data_json: Option<String>,
    pub attachment_id: Option<String>,
    pub seq: u64,
    pub received_at_ms: u64,
}
pub enum ConversationKind {
    Direct,
    Group,
}
pub enum ContentKind {
    Text,
    Structured,
    File,
    System,
}
pub struct Verdict {
    pub plugin_id: String,
    pub result: Result<Decision, CallError>,
}
pub enum Decision {
    Pass,
    Reply(Vec<Draft>),
    Claim(Vec<Draft>),
    Drop,
}
pub struct Draft {
    pub conversation_id: Option<String>,
    pub text: Option<String>,
    pub data_json: Option<String>,
}
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("trap {0}")]
    Trap(String),
}
