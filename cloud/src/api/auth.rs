//! Who is asking: users by API key (read or admin), edges by their sync token.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use super::{ApiError, ApiState};
use crate::config::token_digest;

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a user's key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reports and data.
    Read,
    /// Also master data.
    Admin,
}

/// The caller's role, from the API key (extractor).
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Role);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, ApiError> {
        let http = &s.cfg.http;
        if http.read_keys.is_empty() && http.admin_keys.is_empty() {
            // Loopback only (checked at start): no keys needed.
            return Ok(Caller(Role::Admin));
        }
        // `?api_key=` is for EventSource, which cannot set headers.
        let from_query = parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("api_key="))
                .map(str::to_owned)
        });
        let key = bearer(&parts.headers)
            .map(str::to_owned)
            .or(from_query)
            .ok_or_else(|| {
                ApiError::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into())
            })?;
        if http
            .admin_keys
            .iter()
            .any(|k| same(k.as_bytes(), key.as_bytes()))
        {
            return Ok(Caller(Role::Admin));
        }
        if http
            .read_keys
            .iter()
            .any(|k| same(k.as_bytes(), key.as_bytes()))
        {
            return Ok(Caller(Role::Read));
        }
        Err(ApiError::Unauthorized("API key not accepted".into()))
    }
}

/// The edge whose token this is.
pub(super) fn edge_of(s: &ApiState, headers: &HeaderMap) -> Option<String> {
    let token = bearer(headers)?;
    let digest = token_digest(token);
    let mut found = None;
    // Look at every edge so the time taken does not tell which digest matched.
    for (id, e) in &s.cfg.edges {
        if same(
            e.token_sha256.to_ascii_lowercase().as_bytes(),
            digest.as_bytes(),
        ) {
            found = Some(id.clone());
        }
    }
    found
}
