//! Error responses: RFC 9457 `application/problem+json` with stable types.
//!
//! Bodies never contain the presented key, only what the caller needs to fix the call;
//! the `type` URI is the machine-readable part clients should switch on.

/// Every way keymeter refuses a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Problem {
    MissingCredential,
    MalformedCredential,
    InvalidCredential,
    KeyDisabled,
    KeyExpired,
    KeyNotYetValid,
    OutOfScope,
    /// The path has a form backends disagree on (see `core::auth::path`) and a scope or
    /// route cost depends on it.
    AmbiguousPath,
    AddressNotAllowed,
    KeySetUnavailable,
    /// keymeter cannot decide on the request (the host clock failed, or the key set
    /// names a plan it does not hold): refused, never let through unchecked.
    Unavailable,
    RateLimited,
    QuotaExceeded,
    /// The request's cost is larger than the bucket can ever hold.
    CostExceedsBurst,
    /// A verified JWT whose consumer claim is absent, not a string or not a valid name.
    TokenIdentityUnusable,
    /// A verified JWT with no plan: its plan claim names no plan in the key set and
    /// there is no (existing) `default_plan`.
    TokenPlanUnknown,
}

pub const TYPE_BASE: &str = "urn:keymeter:problem:";
/// The IETF RateLimit draft registers this type for quota exhaustion.
pub const QUOTA_EXCEEDED_TYPE: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

impl Problem {
    pub const ALL: [Problem; 16] = [
        Problem::MissingCredential,
        Problem::MalformedCredential,
        Problem::InvalidCredential,
        Problem::KeyDisabled,
        Problem::KeyExpired,
        Problem::KeyNotYetValid,
        Problem::OutOfScope,
        Problem::AmbiguousPath,
        Problem::AddressNotAllowed,
        Problem::KeySetUnavailable,
        Problem::Unavailable,
        Problem::RateLimited,
        Problem::QuotaExceeded,
        Problem::CostExceedsBurst,
        Problem::TokenIdentityUnusable,
        Problem::TokenPlanUnknown,
    ];

    pub fn status(self) -> u32 {
        use Problem::*;
        match self {
            MissingCredential | MalformedCredential | InvalidCredential | KeyDisabled | KeyExpired | KeyNotYetValid => {
                401
            }
            OutOfScope | AmbiguousPath | AddressNotAllowed | TokenIdentityUnusable | TokenPlanUnknown => 403,
            KeySetUnavailable | Unavailable => 503,
            RateLimited | QuotaExceeded | CostExceedsBurst => 429,
        }
    }

    /// Stable slug: the type URI suffix, and the `reason` label in metrics.
    pub fn slug(self) -> &'static str {
        use Problem::*;
        match self {
            MissingCredential => "missing-credential",
            MalformedCredential => "malformed-credential",
            InvalidCredential => "invalid-credential",
            KeyDisabled => "key-disabled",
            KeyExpired => "key-expired",
            KeyNotYetValid => "key-not-yet-valid",
            OutOfScope => "out-of-scope",
            AmbiguousPath => "ambiguous-path",
            AddressNotAllowed => "address-not-allowed",
            KeySetUnavailable => "keyset-unavailable",
            Unavailable => "unavailable",
            RateLimited => "rate-limited",
            QuotaExceeded => "quota-exceeded",
            CostExceedsBurst => "cost-exceeds-burst",
            TokenIdentityUnusable => "token-identity-unusable",
            TokenPlanUnknown => "token-plan-unknown",
        }
    }

    pub fn title(self) -> &'static str {
        use Problem::*;
        match self {
            MissingCredential => "API key required",
            MalformedCredential => "Malformed API key",
            InvalidCredential => "Invalid API key",
            KeyDisabled => "API key disabled",
            KeyExpired => "API key expired",
            KeyNotYetValid => "API key not yet valid",
            OutOfScope => "API key not allowed for this request",
            AmbiguousPath => "Ambiguous request path",
            AddressNotAllowed => "API key not allowed from this address",
            KeySetUnavailable => "Authentication temporarily unavailable",
            Unavailable => "Request cannot be checked",
            RateLimited => "Rate limit exceeded",
            QuotaExceeded => "Quota exceeded",
            CostExceedsBurst => "Request cost exceeds the rate limit capacity",
            TokenIdentityUnusable => "Token has no usable consumer",
            TokenPlanUnknown => "Token has no plan",
        }
    }

    fn detail(self) -> &'static str {
        use Problem::*;
        match self {
            MissingCredential => "Send your API key in the x-api-key header, as a Bearer token, or with Basic auth.",
            MalformedCredential => {
                "The credential sent is not a well-formed keymeter API key (check for typos or truncation)."
            }
            InvalidCredential => "The API key is not valid.",
            KeyDisabled => "The API key has been disabled by its issuer.",
            KeyExpired => "The API key has expired.",
            KeyNotYetValid => "The API key is not valid yet.",
            OutOfScope => "The API key does not grant this method on this path.",
            AmbiguousPath => {
                "The request path contains a form servers interpret differently ('.' or '..' segments, '//', ';' parameters, %2F, %5C, a backslash or an invalid escape); send the plain path."
            }
            AddressNotAllowed => "The API key may not be used from this client address.",
            KeySetUnavailable => "No key set is loaded yet; retry shortly.",
            Unavailable => "The gateway cannot check this request right now (a server-side fault); retry later.",
            RateLimited => "Too many requests for this API key; retry after the time given in Retry-After.",
            QuotaExceeded => {
                "The API key's quota for the current period is used up; retry after the time given in Retry-After."
            }
            CostExceedsBurst => "This request costs more than the API key's rate limit can ever allow.",
            TokenIdentityUnusable => {
                "The token is valid, but its consumer claim is missing or not a name of 1-64 characters of A-Z a-z 0-9 _ -."
            }
            TokenPlanUnknown => "The token is valid, but it names no plan this API offers.",
        }
    }

    pub fn type_uri(self) -> String {
        match self {
            Problem::QuotaExceeded => QUOTA_EXCEEDED_TYPE.to_string(),
            p => format!("{TYPE_BASE}{}", p.slug()),
        }
    }

    /// The full JSON body. Built once per problem at start-up and reused per request.
    pub fn body(self) -> String {
        serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": self.status(),
            "detail": self.detail(),
        })
        .to_string()
    }
}

/// A JSON problem body for the admin API, with a free-form detail (never key material).
pub fn admin_body(status: u32, slug: &str, title: &str, detail: &str) -> String {
    serde_json::json!({
        "type": format!("{TYPE_BASE}{slug}"),
        "title": title,
        "status": status,
        "detail": detail,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_problem_json() {
        for p in Problem::ALL {
            let v: serde_json::Value = serde_json::from_str(&p.body()).unwrap();
            assert_eq!(v["status"], p.status());
            assert!(v["type"].as_str().unwrap().ends_with(p.slug()));
            assert!(!v["title"].as_str().unwrap().is_empty());
        }
        assert_eq!(Problem::QuotaExceeded.type_uri(), QUOTA_EXCEEDED_TYPE);
    }
}
