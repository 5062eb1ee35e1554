//! The API's one error type: a 4xx with a helpful message for the client's mistakes, a generic
//! 500 (logged) for ours; the errors of the layers below mapped onto it.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openapi::ErrorBody;
use crate::dataset::DatasetError;
use crate::query::QueryError;
use crate::sync::SyncError;

/// An API error: 4xx with a message for the client's mistakes, a logged 500 for ours.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad parameter or body.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// Too big.
    #[error("{0}")]
    TooLarge(String),
    /// Temporarily unable (disk trouble): retry.
    #[error("{0}")]
    Unavailable(String),
    /// Our fault.
    #[error("internal error")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match &self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m.clone()),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m.clone()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            Self::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m.clone()),
            Self::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        let mut r = (status, Json(ErrorBody { error: msg })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<DatasetError> for ApiError {
    fn from(e: DatasetError) -> Self {
        if e.is_retryable() {
            tracing::error!(error = %e, "dataset unavailable");
            Self::Unavailable(format!("storage unavailable, retry later: {e}"))
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid(m) => Self::BadRequest(m),
            QueryError::NotFound(m) => Self::NotFound(m),
            QueryError::Dataset(e) => e.into(),
            QueryError::Polars(e) => e.into(),
        }
    }
}

impl From<SyncError> for ApiError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Unreadable(millrace_shared::WireError::TooLarge(_)) => {
                Self::TooLarge(e.to_string())
            }
            SyncError::Unreadable(_) => Self::BadRequest(e.to_string()),
            e @ SyncError::WrongEdge { .. } => Self::Forbidden(e.to_string()),
            SyncError::Dataset(e) => e.into(),
        }
    }
}

impl From<millrace_shared::time::TimeError> for ApiError {
    fn from(e: millrace_shared::time::TimeError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(e.body_text())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::TooLarge(millrace_shared::service::http::BODY_TOO_LARGE.into());
        }
        Self::BadRequest(e.body_text())
    }
}

impl From<polars::prelude::PolarsError> for ApiError {
    fn from(e: polars::prelude::PolarsError) -> Self {
        if matches!(e, polars::prelude::PolarsError::IO { .. }) {
            // Files that could not be read (storage trouble): retry later.
            tracing::error!(error = %e, "dataset unavailable");
            return Self::Unavailable(format!("storage unavailable, retry later: {e}"));
        }
        Self::Internal(e.to_string())
    }
}
