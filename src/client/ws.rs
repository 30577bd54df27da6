//! The inbox WebSocket: connect, HELLO, heartbeat, typed events and delivery acks.
//!
//! One [`Connection`] is one socket. Reconnecting, backoff and what to do with messages are the
//! inbox's business; this module only speaks the frame protocol and reports how a socket ended.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as Frame};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::Message;
use crate::config::ApiKey;

/// Close codes after which reconnecting with the same key cannot succeed.
const AUTH_TERMINAL_CODES: [u16; 3] = [1008, 4401, 4403];

/// Timings of one connection.
#[derive(Debug, Clone, Copy)]
pub struct WsOptions {
    /// How long to wait for `hello.ok` after sending HELLO.
    pub hello_timeout: Duration,
    /// How often to ping the server when it is quiet.
    pub ping_interval: Duration,
    /// How long the socket may stay silent (no frame, no pong) before it is presumed dead.
    pub idle_timeout: Duration,
}

impl Default for WsOptions {
    fn default() -> Self {
        // The SDKs wait 4 s for hello.ok and ping every 20 s with a 20 s deadline.
        Self {
            hello_timeout: Duration::from_secs(4),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(40),
        }
    }
}

/// Why a socket could not be opened or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The upgrade was answered with an HTTP status instead of a socket.
    #[error("websocket upgrade refused with HTTP {status}")]
    UpgradeRefused {
        /// The HTTP status of the refusal.
        status: u16,
    },
    /// The connection could not be made or broke.
    #[error("websocket transport error: {0}")]
    Transport(#[from] tungstenite::Error),
    /// The connection attempt as a whole took too long.
    #[error("no websocket connection within {0:?}")]
    ConnectTimeout(Duration),
    /// No `hello.ok` arrived in time.
    #[error("no hello.ok within {0:?}")]
    HelloTimeout(Duration),
    /// The first frame after HELLO was something else.
    #[error("expected hello.ok, got {0}")]
    UnexpectedHello(String),
    /// The server closed the socket.
    #[error("websocket closed by server with code {code}: {reason}")]
    Closed {
        /// Close code (1005 when the server sent none).
        code: u16,
        /// Close reason text.
        reason: String,
    },
    /// Nothing was heard from the server for too long.
    #[error("no frame or pong from the server for {0:?}")]
    Silent(Duration),
}

impl WsError {
    /// Whether reconnecting with the same key is pointless (the key is bad or the agent is
    /// suspended). A 1008 that only says HELLO came too late is not terminal.
    pub fn is_auth_terminal(&self) -> bool {
        match self {
            Self::Closed { code, reason } => {
                AUTH_TERMINAL_CODES.contains(code) && !reason.starts_with("HELLO")
            }
            Self::UpgradeRefused { status } => *status == 401 || *status == 403,
            _ => false,
        }
    }
}

/// Something the server sent after `hello.ok`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new (or drained) message.
    Message(Box<Message>),
    /// A well-formed frame of a type the daemon does not act on.
    Other(String),
    /// A frame that does not follow the protocol; `reason` says how.
    Malformed {
        /// The frame as received (binary frames are shown as a length).
        raw: String,
        /// What was wrong with the frame.
        reason: String,
    },
}

/// An authenticated inbox socket.
pub struct Connection {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    ack_mode: bool,
    options: WsOptions,
    last_heard: Instant,
    next_ping: Instant,
}

/// Opens `url`, sends HELLO offering delivery acks and waits for `hello.ok`.
///
/// # Errors
/// When the socket cannot be opened, the server refuses the key or `hello.ok` does not arrive.
pub async fn connect(url: &str, key: &ApiKey, options: WsOptions) -> Result<Connection, WsError> {
    let (mut stream, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(ok) => ok,
        Err(tungstenite::Error::Http(resp)) => {
            return Err(WsError::UpgradeRefused { status: resp.status().as_u16() });
        }
        Err(err) => return Err(err.into()),
    };
    let hello = serde_json::json!({
        "type": "hello",
        "api_key": key.expose(),
        "capabilities": ["ack"],
        "client": "agentchatd",
        "client_version": env!("CARGO_PKG_VERSION"),
    });
    stream.send(Frame::text(hello.to_string())).await?;

    let ack_mode = match timeout(options.hello_timeout, wait_hello(&mut stream)).await {
        Ok(result) => result?,
        Err(_) => {
            let _ = stream.close(Some(close(1008, "HELLO ack timeout"))).await;
            return Err(WsError::HelloTimeout(options.hello_timeout));
        }
    };
    let now = Instant::now();
    Ok(Connection {
        stream,
        ack_mode,
        options,
        last_heard: now,
        next_ping: now + options.ping_interval,
    })
}

/// Reads frames until `hello.ok`; returns whether the server accepted delivery acks.
async fn wait_hello(
    stream: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
) -> Result<bool, WsError> {
    loop {
        let frame = match stream.next().await {
            Some(frame) => frame?,
            None => return Err(closed(None)),
        };
        match frame {
            Frame::Text(text) => {
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|_| WsError::UnexpectedHello(truncate(&text)))?;
                if value.get("type").and_then(|t| t.as_str()) != Some("hello.ok") {
                    return Err(WsError::UnexpectedHello(truncate(&text)));
                }
                let caps = value.get("capabilities").and_then(|c| c.as_array());
                return Ok(caps.is_some_and(|caps| caps.iter().any(|c| c.as_str() == Some("ack"))));
            }
            Frame::Close(frame) => return Err(closed(frame)),
            // Control frames may arrive before hello.ok; tungstenite answers pings itself.
            Frame::Ping(_) | Frame::Pong(_) | Frame::Frame(_) => {}
            Frame::Binary(_) => return Err(WsError::UnexpectedHello("a binary frame".into())),
        }
    }
}

impl Connection {
    /// Whether the server keeps messages until this client acks them.
    pub fn ack_mode(&self) -> bool {
        self.ack_mode
    }

    /// Waits for the next event, keeping the heartbeat going.
    ///
    /// # Errors
    /// When the socket closes, breaks or goes silent.
    pub async fn next_event(&mut self) -> Result<Event, WsError> {
        loop {
            let deadline = self.next_ping.min(self.last_heard + self.options.idle_timeout);
            let frame = tokio::select! {
                frame = self.stream.next() => frame,
                () = tokio::time::sleep_until(deadline) => {
                    self.heartbeat().await?;
                    continue;
                }
            };
            let frame = match frame {
                Some(frame) => frame?,
                None => return Err(closed(None)),
            };
            self.last_heard = Instant::now();
            match frame {
                Frame::Text(text) => return Ok(parse_event(&text)),
                Frame::Close(frame) => return Err(closed(frame)),
                Frame::Binary(bytes) => {
                    let raw = format!("<{} binary bytes>", bytes.len());
                    return Ok(Event::Malformed { raw, reason: "binary frame".into() });
                }
                Frame::Ping(_) | Frame::Pong(_) | Frame::Frame(_) => {}
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<(), WsError> {
        let now = Instant::now();
        if now >= self.last_heard + self.options.idle_timeout {
            return Err(WsError::Silent(self.options.idle_timeout));
        }
        if now >= self.next_ping {
            self.stream.send(Frame::Ping(Vec::new().into())).await?;
            self.next_ping = now + self.options.ping_interval;
        }
        Ok(())
    }

    /// Tells the server a message is handled, in ack mode. A no-op otherwise.
    ///
    /// # Errors
    /// When the frame cannot be written.
    pub async fn ack(&mut self, message_id: &str) -> Result<(), WsError> {
        if !self.ack_mode {
            return Ok(());
        }
        let frame = serde_json::json!({ "type": "ack", "message_id": message_id });
        self.stream.send(Frame::text(frame.to_string())).await?;
        Ok(())
    }

    /// Closes the socket politely (1000), with a short bound on the closing handshake.
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(2), self.stream.close(Some(close(1000, "bye")))).await;
    }
}

fn parse_event(text: &str) -> Event {
    let malformed = |reason: String| Event::Malformed { raw: text.to_owned(), reason };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(err) => return malformed(format!("not JSON: {err}")),
    };
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return malformed("no string `type` field".into());
    };
    if kind != "message.new" {
        return Event::Other(kind.to_owned());
    }
    let Some(payload) = value.get("payload") else {
        return malformed("message.new without payload".into());
    };
    match serde_json::from_value::<Message>(payload.clone()) {
        Ok(message) => Event::Message(Box::new(message)),
        Err(err) => malformed(format!("message.new payload: {err}")),
    }
}

fn closed(frame: Option<CloseFrame>) -> WsError {
    match frame {
        Some(frame) => {
            WsError::Closed { code: u16::from(frame.code), reason: frame.reason.to_string() }
        }
        None => WsError::Closed { code: 1005, reason: String::new() },
    }
}

fn close(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame { code: CloseCode::from(code), reason: reason.into() }
}

fn truncate(text: &str) -> String {
    text.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frames_decode_and_garbage_is_reported() {
        let frame = r#"{"type":"message.new","payload":{"id":"msg_1","conversation_id":"conv_1",
            "sender":"alice","seq":3,"type":"text","content":{"text":"hi"}}}"#;
        match parse_event(frame) {
            Event::Message(m) => assert_eq!((m.id.as_str(), m.seq), ("msg_1", 3)),
            other => panic!("expected a message, got {other:?}"),
        }
        assert!(matches!(parse_event("{not json"), Event::Malformed { .. }));
        assert!(matches!(parse_event(r#"{"payload":{}}"#), Event::Malformed { .. }));
        let bad = r#"{"type":"message.new","payload":{"id":5}}"#;
        assert!(matches!(parse_event(bad), Event::Malformed { .. }));
        assert!(matches!(parse_event(r#"{"type":"presence.update"}"#), Event::Other(_)));
    }

    #[test]
    fn auth_closes_are_terminal_but_hello_timeouts_are_not() {
        let bad_key = WsError::Closed { code: 1008, reason: "Invalid token".into() };
        assert!(bad_key.is_auth_terminal());
        let late = WsError::Closed { code: 1008, reason: "HELLO frame required".into() };
        assert!(!late.is_auth_terminal());
        assert!(
            !WsError::Closed { code: 1001, reason: "Heartbeat timeout".into() }.is_auth_terminal()
        );
    }
}
