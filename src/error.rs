//! The error codes (docs/errors.md) and the OpenAI-shaped error a client gets.

use crate::named::named;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidPrompt,
    UnsupportedModel,
    PayloadTooLarge,
    SafetyBlocked,
    QuotaExhausted,
    ServiceUnavailable,
    UpstreamAuth,
    UpstreamError,
    NoImage,
    NetworkError,
    Overloaded,
    PolicyDenied,
    RateLimited,
    ImageNotFound,
    InternalError,
}

named!(ErrorCode {
    InvalidRequest => "IMG_INVALID_REQUEST",
    InvalidPrompt => "IMG_INVALID_PROMPT",
    UnsupportedModel => "IMG_UNSUPPORTED_MODEL",
    PayloadTooLarge => "IMG_PAYLOAD_TOO_LARGE",
    SafetyBlocked => "IMG_SAFETY_BLOCKED",
    QuotaExhausted => "IMG_QUOTA_EXHAUSTED",
    ServiceUnavailable => "IMG_SERVICE_UNAVAILABLE",
    UpstreamAuth => "IMG_UPSTREAM_AUTH",
    UpstreamError => "IMG_UPSTREAM_ERROR",
    NoImage => "IMG_NO_IMAGE",
    NetworkError => "IMG_NETWORK_ERROR",
    Overloaded => "IMG_OVERLOADED",
    PolicyDenied => "IMG_POLICY_DENIED",
    RateLimited => "IMG_RATE_LIMITED",
    ImageNotFound => "IMG_IMAGE_NOT_FOUND",
    InternalError => "IMG_INTERNAL_ERROR",
});

/// Whose fault an error is: the `category` of an error answer and of the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    UserError,
    ApiError,
    SystemError,
    NetworkError,
}

named!(Category {
    UserError => "USER_ERROR",
    ApiError => "API_ERROR",
    SystemError => "SYSTEM_ERROR",
    NetworkError => "NETWORK_ERROR",
});

impl ErrorCode {
    /// The HTTP status; `IMG_NETWORK_ERROR` is 504 instead when the cause was a timeout.
    pub fn status(self) -> u32 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidPrompt
            | ErrorCode::UnsupportedModel
            | ErrorCode::SafetyBlocked => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::PolicyDenied => 403,
            ErrorCode::ImageNotFound => 404,
            ErrorCode::QuotaExhausted | ErrorCode::RateLimited => 429,
            ErrorCode::ServiceUnavailable | ErrorCode::Overloaded => 503,
            ErrorCode::UpstreamAuth | ErrorCode::UpstreamError | ErrorCode::NoImage | ErrorCode::NetworkError => 502,
            ErrorCode::InternalError => 500,
        }
    }

    /// OpenAI's `type`.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidPrompt
            | ErrorCode::UnsupportedModel
            | ErrorCode::PayloadTooLarge
            | ErrorCode::SafetyBlocked
            | ErrorCode::ImageNotFound => "invalid_request_error",
            ErrorCode::PolicyDenied => "permission_error",
            ErrorCode::QuotaExhausted | ErrorCode::RateLimited => "rate_limit_error",
            ErrorCode::ServiceUnavailable
            | ErrorCode::UpstreamAuth
            | ErrorCode::UpstreamError
            | ErrorCode::NoImage
            | ErrorCode::NetworkError
            | ErrorCode::Overloaded => "api_error",
            ErrorCode::InternalError => "server_error",
        }
    }

    pub fn category(self) -> Category {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidPrompt
            | ErrorCode::UnsupportedModel
            | ErrorCode::PayloadTooLarge
            | ErrorCode::SafetyBlocked
            | ErrorCode::PolicyDenied
            | ErrorCode::RateLimited
            | ErrorCode::ImageNotFound => Category::UserError,
            ErrorCode::QuotaExhausted
            | ErrorCode::ServiceUnavailable
            | ErrorCode::UpstreamError
            | ErrorCode::NoImage => Category::ApiError,
            ErrorCode::UpstreamAuth | ErrorCode::Overloaded | ErrorCode::InternalError => Category::SystemError,
            ErrorCode::NetworkError => Category::NetworkError,
        }
    }

    /// What the caller (or the operator) can do about it.
    pub fn resolution(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => {
                "Fix the request: it must be a JSON object of the OpenAI Images API with the values listed in the docs."
            }
            ErrorCode::InvalidPrompt => {
                "Send a non-empty prompt within the length limit, and rephrase it if the model rejected it."
            }
            ErrorCode::UnsupportedModel => {
                "Use gemini-3-pro-image, one of its variants, or an alias configured on this gateway."
            }
            ErrorCode::PayloadTooLarge => "Send a smaller request body.",
            ErrorCode::SafetyBlocked => "Rephrase the prompt; the request was blocked by content safety.",
            ErrorCode::QuotaExhausted => "Retry after the delay in retry-after, or lower the request rate.",
            ErrorCode::ServiceUnavailable => "Retry later with backoff; Gemini is temporarily unavailable.",
            ErrorCode::UpstreamAuth => "Contact the gateway operator: the gateway's Gemini credentials were rejected.",
            ErrorCode::UpstreamError => "Retry later; if it persists, contact the gateway operator.",
            ErrorCode::NoImage => "Retry, or rephrase the prompt to ask for an image explicitly.",
            ErrorCode::NetworkError => "Retry later; the gateway could not reach Gemini in time.",
            ErrorCode::Overloaded => {
                "Retry after the delay in retry-after; this gateway worker holds as many requests as it may."
            }
            ErrorCode::PolicyDenied => {
                "Ask the gateway operator for a profile that allows this; the profile in force does not."
            }
            ErrorCode::RateLimited => {
                "Retry after the delay in retry-after; your profile's images per minute on this gateway are used up."
            }
            ErrorCode::ImageNotFound => "Generate the image again: this image URL is unknown or has expired.",
            ErrorCode::InternalError => "Retry later and report the x-request-id to the gateway operator.",
        }
    }

    /// Whether a client should retry the same request.
    pub fn should_retry(self) -> bool {
        !matches!(self.status(), 400 | 403 | 404 | 413) && self != ErrorCode::UpstreamAuth
    }

    /// Which error wins when all `n` calls failed differently: the one that tells the caller
    /// most about what to do (lower is chosen first).
    pub fn precedence(self) -> u8 {
        match self {
            ErrorCode::UpstreamAuth => 0,
            ErrorCode::QuotaExhausted => 1,
            ErrorCode::SafetyBlocked => 2,
            ErrorCode::InvalidPrompt => 3,
            ErrorCode::ServiceUnavailable => 4,
            ErrorCode::NetworkError | ErrorCode::Overloaded => 5,
            ErrorCode::NoImage => 6,
            ErrorCode::RateLimited => 5,
            ErrorCode::UpstreamError => 7,
            ErrorCode::InvalidRequest
            | ErrorCode::UnsupportedModel
            | ErrorCode::PayloadTooLarge
            | ErrorCode::PolicyDenied
            | ErrorCode::ImageNotFound
            | ErrorCode::InternalError => 8,
        }
    }
}

/// An error answer: the code plus what the message and headers need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<&'static str>,
    /// Seconds for `retry-after`, from Gemini's RetryInfo.
    pub retry_after: Option<u64>,
    /// A status other than the code's own: 504 for a network error that was a timeout, 405
    /// for a method the endpoint does not answer.
    pub status_override: Option<u16>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), param: None, retry_after: None, status_override: None }
    }

    pub fn param(code: ErrorCode, param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param), ..ApiError::new(code, message) }
    }

    /// A network error caused by a timeout: 504.
    pub fn timed_out(message: impl Into<String>) -> ApiError {
        ApiError { status_override: Some(504), ..ApiError::new(ErrorCode::NetworkError, message) }
    }

    pub fn status(&self) -> u32 {
        self.status_override.map_or_else(|| self.code.status(), u32::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::named::Named;

    #[test]
    fn table_rows_match_the_contract() {
        let rows = [
            ("IMG_INVALID_REQUEST", 400, "invalid_request_error", "USER_ERROR"),
            ("IMG_INVALID_PROMPT", 400, "invalid_request_error", "USER_ERROR"),
            ("IMG_UNSUPPORTED_MODEL", 400, "invalid_request_error", "USER_ERROR"),
            ("IMG_PAYLOAD_TOO_LARGE", 413, "invalid_request_error", "USER_ERROR"),
            ("IMG_SAFETY_BLOCKED", 400, "invalid_request_error", "USER_ERROR"),
            ("IMG_QUOTA_EXHAUSTED", 429, "rate_limit_error", "API_ERROR"),
            ("IMG_SERVICE_UNAVAILABLE", 503, "api_error", "API_ERROR"),
            ("IMG_UPSTREAM_AUTH", 502, "api_error", "SYSTEM_ERROR"),
            ("IMG_UPSTREAM_ERROR", 502, "api_error", "API_ERROR"),
            ("IMG_NO_IMAGE", 502, "api_error", "API_ERROR"),
            ("IMG_NETWORK_ERROR", 502, "api_error", "NETWORK_ERROR"),
            ("IMG_OVERLOADED", 503, "api_error", "SYSTEM_ERROR"),
            ("IMG_POLICY_DENIED", 403, "permission_error", "USER_ERROR"),
            ("IMG_RATE_LIMITED", 429, "rate_limit_error", "USER_ERROR"),
            ("IMG_IMAGE_NOT_FOUND", 404, "invalid_request_error", "USER_ERROR"),
            ("IMG_INTERNAL_ERROR", 500, "server_error", "SYSTEM_ERROR"),
        ];
        assert_eq!(rows.len(), ErrorCode::ALL.len());
        for (&code, (name, status, ty, cat)) in ErrorCode::ALL.iter().zip(rows) {
            assert_eq!(
                (code.as_str(), code.status(), code.error_type(), code.category().as_str()),
                (name, status, ty, cat)
            );
        }
    }

    #[test]
    fn timeouts_answer_504() {
        assert_eq!(ApiError::new(ErrorCode::NetworkError, "x").status(), 502);
        assert_eq!(ApiError::timed_out("x").status(), 504);
    }
}
