//! Checks a plugin's decision before the daemon may act on it.
//!
//! The host never trusts guest output: a decision that breaks a limit becomes
//! [`CallError::BadOutput`] for that call and nothing from it is queued.

use super::{CallError, Decision, Draft};

/// Largest draft text, in bytes (the API's limit for a text message).
pub const MAX_TEXT_BYTES: usize = 32 * 1024;

/// Most drafts one decision may carry; more is a plugin bug, not a conversation.
pub const MAX_DRAFTS_PER_DECISION: usize = 16;

/// Returns the decision unchanged when every draft in it is acceptable.
pub(crate) fn check_decision(decision: Decision) -> Result<Decision, CallError> {
    if let Decision::Reply(drafts) | Decision::Claim(drafts) = &decision {
        check_drafts(drafts)?;
    }
    Ok(decision)
}

fn check_drafts(drafts: &[Draft]) -> Result<(), CallError> {
    if drafts.len() > MAX_DRAFTS_PER_DECISION {
        return Err(CallError::BadOutput(format!(
            "decision has {} drafts; the limit is {MAX_DRAFTS_PER_DECISION}",
            drafts.len()
        )));
    }
    for (idx, draft) in drafts.iter().enumerate() {
        check_draft(draft).map_err(|why| CallError::BadOutput(format!("draft {idx}: {why}")))?;
    }
    Ok(())
}

fn check_draft(draft: &Draft) -> Result<(), String> {
    if draft.conversation_id.as_deref() == Some("") {
        return Err("conversation-id is empty; use none to answer in the same conversation".into());
    }
    check_content(draft.text.as_deref(), draft.data_json.as_deref())
}

/// Checks message content from any hook or import: text, data or both, within limits.
pub(crate) fn check_content(text: Option<&str>, data_json: Option<&str>) -> Result<(), String> {
    if text.is_none() && data_json.is_none() {
        return Err("neither text nor data-json is set; set at least one".to_string());
    }
    if let Some(text) = text
        && text.len() > MAX_TEXT_BYTES
    {
        return Err(format!("text is {} bytes; the limit is {MAX_TEXT_BYTES}", text.len()));
    }
    if let Some(data) = data_json {
        match serde_json::from_str::<serde_json::Value>(data) {
            Ok(serde_json::Value::Object(_)) => {}
            Ok(_) => return Err("data-json must be a JSON object".to_string()),
            Err(err) => return Err(format!("data-json is not valid JSON: {err}")),
        }
    }
    Ok(())
}
