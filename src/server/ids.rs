//! Identifier and secret minting: prefixed opaque ids, delivery ids, API keys and their
//! hashes. Everything random comes from the thread-local CSPRNG.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// `<prefix>_` + base64url (no padding) of 12 random bytes, e.g. `msg_Ab3…` (16 chars).
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// `del_` + 32 lower-case hex characters: the only sync cursor format clients accept.
pub fn new_delivery_id() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("del_{}", hex::encode(bytes))
}

/// Whether `cursor` has the delivery id shape, checked before any lookup.
pub fn is_delivery_id(cursor: &str) -> bool {
    cursor.strip_prefix("del_").is_some_and(|rest| {
        rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A fresh API key: `ac_` + base64url of 32 random bytes (46 chars in all).
pub fn new_api_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("ac_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Lower-case hex SHA-256 of a key; the only form in which keys are stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A random UUID-v4-shaped request id, for requests that did not bring a usable one.
pub fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
