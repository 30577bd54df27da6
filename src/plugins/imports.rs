//! The host side of the imports that reach the daemon: `kv`, `messaging`, `history` and
//! `http`. Each checks the operator's grant on every call (a manifest only declares intent),
//! never waits past the calling hook's budget, and reports failures as the WIT's error
//! variants rather than traps, so a plugin can decide what to do about them.

use std::time::Duration;

use tokio::time::Instant;

use super::bindings::agentchat::plugin::{history, http, kv, messaging};
use super::bindings::wit;
use super::call::{CallState, truncate};
use super::hooks::MAX_HOPS;
use crate::client::{Content, SendRequest};
use crate::outbox::{self, Priority};
use crate::store::{KV_MAX_KEY_BYTES, KV_MAX_VALUE_BYTES, KvWrite};

/// Largest HTTP response body handed to a plugin.
pub const HTTP_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Redirects followed per request, each checked against the grant.
const HTTP_MAX_REDIRECTS: usize = 5;

/// Most keys one `list-keys` call returns.
const KV_MAX_LIST: u32 = 1000;

/// The window of the per-minute send cap.
const SEND_WINDOW: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    outbox::now_ms()
}

fn expiry(ttl_ms: Option<u64>) -> Option<i64> {
    ttl_ms.map(|ttl| now_ms().saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX / 2)))
}

impl CallState {
    fn kv_allowed(&self, key: &str) -> Result<&crate::store::Store, kv::KvError> {
        if !self.target.grants.capabilities.kv {
            return Err(kv::KvError::NotGranted);
        }
        if key.len() > KV_MAX_KEY_BYTES {
            return Err(kv::KvError::TooLarge);
        }
        self.target.services.store.as_ref().ok_or_else(|| {
            kv::KvError::Unavailable("this host has no state store (offline test run)".into())
        })
    }

    fn kv_failed(&self, err: &crate::store::StoreError) -> kv::KvError {
        tracing::warn!(plugin = %self.target.id, error = %err, "plugin kv call failed");
        kv::KvError::Unavailable("the daemon's state store failed; try again later".into())
    }
}

impl kv::Host for CallState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::KvError> {
        let store = self.kv_allowed(&key)?;
        store.kv_get(&self.target.id, &key, now_ms()).await.map_err(|err| self.kv_failed(&err))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), kv::KvError> {
        self.put(key, value, None, ttl_ms).await.map(drop)
    }

    async fn delete(&mut self, key: String) -> Result<(), kv::KvError> {
        let store = self.kv_allowed(&key)?;
        store.kv_delete(&self.target.id, &key).await.map_err(|err| self.kv_failed(&err))
    }

    async fn list_keys(&mut self, prefix: String, limit: u32) -> Result<Vec<String>, kv::KvError> {
        let store = self.kv_allowed(&prefix)?;
        let limit = limit.min(KV_MAX_LIST);
        store
            .kv_keys(&self.target.id, &prefix, limit, now_ms())
            .await
            .map_err(|err| self.kv_failed(&err))
    }

    async fn swap_if(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, kv::KvError> {
        self.put(key, value, Some(expected), ttl_ms).await
    }
}

impl CallState {
    async fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        expected: Option<Option<Vec<u8>>>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, kv::KvError> {
        let store = self.kv_allowed(&key)?;
        if value.len() > KV_MAX_VALUE_BYTES {
            return Err(kv::KvError::TooLarge);
        }
        let quota = self.target.grants.kv_max_bytes;
        let written = store
            .kv_put(&self.target.id, &key, value, expected, expiry(ttl_ms), quota, now_ms())
            .await
            .map_err(|err| self.kv_failed(&err))?;
        match written {
            KvWrite::Stored => Ok(true),
            KvWrite::Mismatch => Ok(false),
            KvWrite::OverQuota => Err(kv::KvError::QuotaExceeded),
        }
    }
}

impl messaging::Host for CallState {
    async fn send(&mut self, msg: wit::NewMessage) -> Result<String, messaging::SendRefusal> {
        use messaging::SendRefusal;

        if !self.target.grants.capabilities.send {
            return Err(SendRefusal::NotGranted);
        }
        let Some(trigger) = self.scope.trigger else {
            tracing::warn!(plugin = %self.target.id, "send refused: not allowed in this hook");
            return Err(SendRefusal::LoopDetected);
        };
        if self.scope.hops > MAX_HOPS {
            tracing::warn!(
                plugin = %self.target.id, hops = self.scope.hops,
                "send refused: too many hops from the event that started the chain"
            );
            return Err(SendRefusal::LoopDetected);
        }
        let (to, conversation_id) = match (msg.to, msg.conversation_id) {
            (Some(to), None) => {
                let handle = to.trim_start_matches('@').to_lowercase();
                if handle.is_empty() {
                    return Err(SendRefusal::Invalid("`to` is empty".into()));
                }
                (Some(handle), None)
            }
            (None, Some(conversation)) if conversation.starts_with("grp_") => {
                (None, Some(conversation))
            }
            (None, Some(_)) => {
                return Err(SendRefusal::Invalid(
                    "conversation-id must name a group (grp_…); address direct messages by `to`"
                        .into(),
                ));
            }
            _ => {
                return Err(SendRefusal::Invalid(
                    "set exactly one of `to` and `conversation-id`".into(),
                ));
            }
        };
        super::validate::check_content(msg.text.as_deref(), msg.data_json.as_deref())
            .map_err(SendRefusal::Invalid)?;
        let data = match &msg.data_json {
            Some(json) => Some(
                serde_json::from_str(json)
                    .map_err(|err| SendRefusal::Invalid(format!("data-json: {err}")))?,
            ),
            None => None,
        };
        let kind = if msg.text.is_none() { "structured" } else { "text" };
        let content = Content { text: msg.text, data, attachment_id: None };
        if let Some(why) = outbox::content_too_large(&content) {
            return Err(SendRefusal::Invalid(why));
        }
        self.take_send_slot()?;

        let part = match &msg.key {
            Some(key) if !key.is_empty() && key.len() <= 128 => format!("k:{key}"),
            Some(_) => return Err(SendRefusal::Invalid("key must be 1 to 128 bytes".into())),
            None => format!("n:{}", self.sends_made),
        };
        self.sends_made += 1;
        let key = outbox::plugin_key(&self.target.id, &self.scope.cause, &part);
        let request = SendRequest {
            to,
            conversation_id,
            client_msg_id: key.clone(),
            kind: kind.to_owned(),
            content,
        };
        let origin =
            outbox::plugin_origin(&self.target.id, trigger, self.scope.hops, &self.scope.cause);
        let (Some(store), Some(wake)) =
            (&self.target.services.store, &self.target.services.outbox_wake)
        else {
            return Err(SendRefusal::Unavailable(
                "this host has no outbox (offline test run)".into(),
            ));
        };
        match store.enqueue(outbox::new_send(key.clone(), &request, origin), now_ms()).await {
            Ok(fresh) => {
                tracing::debug!(plugin = %self.target.id, key, fresh, "plugin queued a send");
                wake.notify_one();
                Ok(key)
            }
            Err(err) => {
                tracing::warn!(plugin = %self.target.id, error = %err, "plugin send not queued");
                Err(SendRefusal::Unavailable("the daemon's queue failed; try again later".into()))
            }
        }
    }
}

impl CallState {
    /// Counts a send against the plugin's per-minute cap.
    fn take_send_slot(&self) -> Result<(), messaging::SendRefusal> {
        let cap = usize::try_from(self.target.grants.send_per_minute).unwrap_or(usize::MAX);
        self.target.services.send_windows.take(&self.target.id, cap, SEND_WINDOW).map_err(|wait| {
            tracing::warn!(plugin = %self.target.id, cap, "send refused: per-minute cap reached");
            messaging::SendRefusal::OverLimit(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
        })
    }
}

impl history::Host for CallState {
    async fn recent(
        &mut self,
        conversation_id: String,
        limit: u32,
    ) -> Result<Vec<wit::HistoryMessage>, history::HistoryError> {
        use history::HistoryError;

        if !self.target.grants.capabilities.history {
            return Err(HistoryError::NotGranted);
        }
        let Some(api) = &self.target.services.api else {
            return Err(HistoryError::Unavailable("this host has no API client".into()));
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        let read = async {
            api.limiter.acquire(Priority::Normal).await;
            api.client.history_recent(&conversation_id, limit.clamp(1, 200)).await
        };
        let rows = match tokio::time::timeout(left, read).await {
            Err(_) => return Err(HistoryError::Unavailable("the hook's time ran out".into())),
            Ok(Ok(rows)) => rows,
            Ok(Err(err)) => {
                return Err(match err.disposition() {
                    crate::client::Disposition::Permanent => HistoryError::Refused(err.to_string()),
                    _ => HistoryError::Unavailable(err.to_string()),
                });
            }
        };
        Ok(rows
            .into_iter()
            .map(|m| wit::HistoryMessage {
                kind: super::bindings::to_wit_kind(super::content_kind(&m.kind)),
                data_json: m.content.data.as_ref().map(ToString::to_string),
                text: m.content.text,
                attachment_id: m.content.attachment_id,
                created_at: m.created_at.unwrap_or_default(),
                id: m.id,
                sender: m.sender,
                seq: m.seq,
            })
            .collect())
    }
}

/// Why the HTTP client refused to follow a redirect; recognised in the error chain.
#[derive(Debug)]
struct RedirectRefused(String);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RedirectRefused {}

/// Whether `url` may be fetched under `granted`: http or https, and a host (with the port,
/// when the grant names one) that the operator listed. Only the parsed absolute URL counts,
/// never a header.
pub(crate) fn host_allowed(url: &reqwest::Url, granted: &[String]) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme `{}` (only http and https)", url.scheme()));
    }
    let Some(host) = url.host_str() else {
        return Err("a URL without a host".into());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let port = url.port_or_known_default();
    let ok = granted.iter().any(|grant| {
        let grant = grant.to_ascii_lowercase();
        match grant.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h == host && p.parse::<u16>().ok() == port
            }
            _ => grant.trim_start_matches('[').trim_end_matches(']') == host,
        }
    });
    if ok { Ok(()) } else { Err(format!("{host}:{}", port.unwrap_or(0))) }
}

/// The HTTP client of one plugin: no proxy (the allowlist must be what is reached), and every
/// redirect checked against the grant before it is followed.
pub(crate) fn http_client(granted: Vec<String>) -> Result<reqwest::Client, reqwest::Error> {
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= HTTP_MAX_REDIRECTS {
            return attempt
                .error(RedirectRefused(format!("more than {HTTP_MAX_REDIRECTS} redirects")));
        }
        match host_allowed(attempt.url(), &granted) {
            Ok(()) => attempt.follow(),
            Err(host) => attempt.error(RedirectRefused(format!("redirect to {host}"))),
        }
    });
    reqwest::Client::builder()
        .no_proxy()
        .redirect(policy)
        .user_agent(concat!("agentchatd/", env!("CARGO_PKG_VERSION"), " plugin"))
        .build()
}

impl http::Host for CallState {
    async fn fetch(&mut self, req: http::Request) -> Result<http::Response, http::HttpError> {
        use http::HttpError;

        let Some(client) = self.target.http.clone() else {
            return Err(HttpError::NotGranted("no host is granted to this plugin".into()));
        };
        let url = reqwest::Url::parse(&req.url)
            .map_err(|err| HttpError::Invalid(format!("url is not absolute: {err}")))?;
        host_allowed(&url, &self.target.grants.capabilities.http_allowed_hosts)
            .map_err(HttpError::NotGranted)?;
        let method = match req.method.to_ascii_uppercase().as_str() {
            "GET" => reqwest::Method::GET,
            "POST" => reqwest::Method::POST,
            "PUT" => reqwest::Method::PUT,
            "PATCH" => reqwest::Method::PATCH,
            "DELETE" => reqwest::Method::DELETE,
            "HEAD" => reqwest::Method::HEAD,
            other => return Err(HttpError::Invalid(format!("method `{other}` is not supported"))),
        };
        let mut builder = client.request(method, url.clone());
        for (name, value) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| HttpError::Invalid(format!("header name `{name}`")))?;
            if name == reqwest::header::HOST {
                return Err(HttpError::Invalid("the Host header is set from the URL".into()));
            }
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| HttpError::Invalid(format!("header `{name}` has a bad value")))?;
            builder = builder.header(name, value);
        }
        if let Some(bearer) = &self.target.grants.http_bearer
            && host_allowed(&url, std::slice::from_ref(&bearer.host)).is_ok()
            && !req.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        {
            // Marked sensitive so it never shows in debug output; reqwest drops it when a
            // redirect leaves this host.
            let token = format!("Bearer {}", bearer.token.expose());
            let mut value = reqwest::header::HeaderValue::from_str(&token).map_err(|_| {
                HttpError::Invalid("the granted bearer token is not a header".into())
            })?;
            value.set_sensitive(true);
            builder = builder.header(reqwest::header::AUTHORIZATION, value);
        }
        if let Some(body) = req.body {
            builder = builder.body(body);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wanted = req.timeout_ms.map_or(left, |ms| Duration::from_millis(u64::from(ms)));
        let budget = wanted.min(left);
        let plugin = self.target.id.clone();
        let exchange = async move {
            let mut response = builder.send().await.map_err(|err| describe(&err))?;
            let status = response.status().as_u16();
            let final_url = response.url().to_string();
            let headers = response
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|err| describe(&err))? {
                if body.len() + chunk.len() > HTTP_MAX_RESPONSE_BYTES {
                    return Err(HttpError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(http::Response { status, headers, body, url: final_url })
        };
        let result = match tokio::time::timeout(budget, exchange).await {
            Err(_) => Err(HttpError::Timeout),
            Ok(result) => result,
        };
        match &result {
            Ok(response) => tracing::debug!(%plugin, status = response.status, "plugin http done"),
            Err(err) => tracing::debug!(%plugin, error = ?err, "plugin http failed"),
        }
        result
    }
}

/// Maps a reqwest failure onto the WIT error, recognising refused redirects.
fn describe(err: &reqwest::Error) -> http::HttpError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<RedirectRefused>() {
            return http::HttpError::NotGranted(refused.0.clone());
        }
        source = cause.source();
    }
    if err.is_timeout() {
        return http::HttpError::Timeout;
    }
    http::HttpError::Failed(truncate(&format!("{err:#}"), 512).to_owned())
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    fn allowed(url: &str, granted: &[&str]) -> Result<(), String> {
        let granted: Vec<String> = granted.iter().map(|g| (*g).to_string()).collect();
        host_allowed(&reqwest::Url::parse(url).expect("url"), &granted)
    }

    #[test]
    fn only_granted_hosts_and_ports_pass() {
        assert!(allowed("https://api.example.com/v1/chat", &["api.example.com"]).is_ok());
        assert!(allowed("https://API.Example.com/", &["api.example.com"]).is_ok());
        assert!(allowed("http://127.0.0.1:8080/x", &["127.0.0.1"]).is_ok());
        assert!(allowed("http://127.0.0.1:8080/x", &["127.0.0.1:8080"]).is_ok());
        assert!(allowed("http://127.0.0.1:8081/x", &["127.0.0.1:8080"]).is_err());
        assert!(allowed("https://api.example.com/", &["api.example.com:443"]).is_ok());
        assert!(allowed("http://[::1]:9/", &["[::1]:9"]).is_ok());
        assert!(allowed("http://[::1]:9/", &["::1"]).is_ok());
    }

    #[test]
    fn lookalikes_and_other_schemes_are_refused() {
        let grant = ["api.example.com"];
        assert!(allowed("https://api.example.com.evil.test/", &grant).is_err());
        assert!(allowed("https://evil.test/?u=https://api.example.com/", &grant).is_err());
        assert!(allowed("https://api.example.com@evil.test/", &grant).is_err());
        assert!(allowed("ftp://api.example.com/", &grant).is_err());
        assert!(allowed("file:///etc/passwd", &grant).is_err());
        let err = allowed("https://other.test:8443/", &grant).expect_err("not granted");
        assert_eq!(err, "other.test:8443");
    }
}
