//! The registry's side of a pull, spoken over reqwest: a manifest, a token, a blob.
//!
//! Written here rather than left to oci-client because oci-client reads manifest, token
//! and error bodies whole into memory, so a registry, which hearth does not trust, would
//! choose how much memory a pull takes. Every body read here has a byte cap, checked
//! against the declared length before reading and against what arrives while reading,
//! and a manifest or token request has a deadline. Blobs are streamed by the caller,
//! bounded by the size their manifest declares. oci-client's manifest types are kept
//! for parsing.
//!
//! Authentication follows the distribution protocol. A request is sent with what worked
//! for its repository before (nothing at first). A 401 names a challenge: `Basic` is
//! answered with the configured credentials; `Bearer realm=...,service=...,scope=...`
//! with a token fetched from the realm, with the credentials when configured. The
//! request is then sent once more. A grant is kept per repository and replaced on the
//! next 401. Credentials go to a realm only over HTTPS or on the registry's own host, and
//! reqwest drops the Authorization header on a redirect to another host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciManifest,
};
use reqwest::header::{ACCEPT, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use sha2::{Digest, Sha256};

/// Largest manifest or index accepted: the distribution registry's own limit. Real
/// manifests are a few KiB; an index of every platform tens of KiB.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Largest token response accepted. Real ones (a JWT and a few fields) are a few KiB.
pub const MAX_TOKEN_BYTES: u64 = 64 << 10;

/// Most of an error response read; the rest is not read at all.
const MAX_ERROR_BYTES: u64 = 16 << 10;

/// Most characters of a registry's error message shown (it is the registry's text).
const SHOWN_MESSAGE_CHARS: usize = 300;

/// Most error codes kept from one error response.
const SHOWN_CODES: usize = 4;

/// A manifest or token request, body included, must be done within this; a registry
/// trickling bytes under the cap would otherwise hold the pull for as long as it likes.
/// Blobs have only the client's per-read timeout: they are large by nature.
const SMALL_BODY_DEADLINE: Duration = Duration::from_secs(60);

/// Repositories whose grant is kept at once; past it, all are forgotten and fetched anew.
const MAX_GRANTS: usize = 64;

/// The manifest media types asked for, in the Accept header and accepted in a body.
const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Why a request to the registry failed. The registry's own words (messages, codes) are
/// bounded and made printable before they are kept.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No answer: connection, TLS, timeout, or a body cut short.
    #[error("{0}")]
    Transport(#[source] reqwest::Error),
    /// The registry answered with an error status.
    #[error("HTTP {status}{}", status_detail(.codes, .message))]
    Status {
        /// The HTTP status.
        status: u16,
        /// The distribution error codes of the body (`MANIFEST_UNKNOWN`...).
        codes: Vec<String>,
        /// The body's messages, or its text.
        message: String,
    },
    /// A body over its cap, refused before reading when its length was declared,
    /// otherwise as soon as the cap was passed.
    #[error("the registry sent a {what} {}over the limit of {max} bytes", declared_detail(.declared))]
    TooLarge {
        /// `manifest` or `token response`.
        what: &'static str,
        /// The cap.
        max: u64,
        /// The length the registry declared, if it declared one.
        declared: Option<u64>,
    },
    /// A token could not be had from the realm the registry named.
    #[error("token from {realm}: {reason}")]
    Token {
        /// The realm (a URL the registry named), bounded.
        realm: String,
        /// What was wrong.
        reason: String,
    },
    /// A manifest that is not one hearth can use, or not the one asked for.
    #[error("{0}")]
    Manifest(String),
}

fn status_detail(codes: &[String], message: &str) -> String {
    let mut out = String::new();
    if !codes.is_empty() {
        out.push_str(&format!(" ({})", codes.join(", ")));
    }
    if !message.is_empty() {
        out.push_str(": ");
        out.push_str(message);
    }
    out
}

fn declared_detail(declared: &Option<u64>) -> String {
    match declared {
        Some(len) => format!("of {len} bytes, "),
        None => String::new(),
    }
}

impl RegistryError {
    /// Whether the registry could not be reached or stopped answering.
    pub fn is_transport(&self) -> bool {
        matches!(self, RegistryError::Transport(_))
    }

    /// Whether the registry said the repository, tag or manifest does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            RegistryError::Status { status, codes, .. } => {
                *status == 404
                    || codes.iter().any(|c| {
                        matches!(
                            c.as_str(),
                            "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "NOT_FOUND"
                        )
                    })
            }
            _ => false,
        }
    }

    /// Whether this is a body over its cap.
    pub fn is_too_large(&self) -> bool {
        matches!(self, RegistryError::TooLarge { .. })
    }
}

/// What worked for a repository last time.
#[derive(Clone)]
enum Grant {
    Basic,
    Bearer(String),
}

/// One registry (`scheme://host[:port]`), its HTTP client (connections kept), its
/// credentials and the grants it gave.
pub struct Registry {
    http: reqwest::Client,
    base: String,
    host: String,
    credentials: Option<(String, String)>,
    grants: Mutex<HashMap<String, Grant>>,
}

impl Registry {
    /// A client for `registry` (`host[:port]`): plain HTTP when `insecure`, otherwise
    /// HTTPS only, redirects and token realms included.
    pub fn new(
        registry: &str,
        insecure: bool,
        credentials: Option<(&str, &str)>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Registry, reqwest::Error> {
        // reqwest is built without a default TLS provider (ring is smaller to build than
        // aws-lc); install ring once per process. An error means one is already
        // installed, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .https_only(!insecure)
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let scheme = if insecure { "http" } else { "https" };
        Ok(Registry {
            http,
            base: format!("{scheme}://{registry}"),
            host: registry.to_string(),
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            grants: Mutex::new(HashMap::new()),
        })
    }

    /// `scheme://host[:port]`, for messages.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// The manifest `reference` (a tag or `sha256:` digest) of `repo`, parsed, and the
    /// sha256 digest of its bytes. A digest reference must match what arrived.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(OciManifest, String), RegistryError> {
        let accept = MANIFEST_TYPES.join(", ");
        let res = self
            .get(
                repo,
                &format!("manifests/{reference}"),
                Some(&accept),
                Some(SMALL_BODY_DEADLINE),
            )
            .await?;
        let res = successful(res).await?;
        let body = read_capped(res, MAX_MANIFEST_BYTES, "manifest").await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if reference.contains(':') && reference != digest {
            return Err(RegistryError::Manifest(format!(
                "manifest {} arrived with digest {digest}",
                crate::text::bounded_printable(reference, 100)
            )));
        }
        Ok((parse_manifest(&body)?, digest))
    }

    /// The blob `digest` of `repo`, its status checked; the caller streams the body.
    pub async fn blob(&self, repo: &str, digest: &str) -> Result<Response, RegistryError> {
        let res = self
            .get(repo, &format!("blobs/{digest}"), None, None)
            .await?;
        successful(res).await
    }

    /// GET `/v2/<repo>/<path>`, answering one authentication challenge. The response is
    /// returned whatever its status.
    async fn get(
        &self,
        repo: &str,
        path: &str,
        accept: Option<&str>,
        deadline: Option<Duration>,
    ) -> Result<Response, RegistryError> {
        let url = format!("{}/v2/{repo}/{path}", self.base);
        let mut grant = self.grants.lock().ok().and_then(|g| g.get(repo).cloned());
        let mut renewed = false;
        loop {
            let mut request = self.http.get(&url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(deadline) = deadline {
                request = request.timeout(deadline);
            }
            request = match (&grant, &self.credentials) {
                (Some(Grant::Bearer(token)), _) => request.bearer_auth(token),
                (Some(Grant::Basic), Some((user, password))) => {
                    request.basic_auth(user, Some(password))
                }
                _ => request,
            };
            let res = request.send().await.map_err(RegistryError::Transport)?;
            if res.status() != StatusCode::UNAUTHORIZED || renewed {
                return Ok(res);
            }
            let challenges = challenges(res.headers());
            let answer = if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
                Grant::Bearer(self.token(repo, bearer).await?)
            } else if challenges.iter().any(|c| c.scheme == "basic") && self.credentials.is_some() {
                Grant::Basic
            } else {
                return Ok(res);
            };
            if let Ok(mut grants) = self.grants.lock() {
                if grants.len() >= MAX_GRANTS {
                    grants.clear();
                }
                grants.insert(repo.to_string(), answer.clone());
            }
            grant = Some(answer);
            renewed = true;
        }
    }

    /// A token from the realm a Bearer challenge names, for `repo` (or the challenge's
    /// own scope).
    async fn token(&self, repo: &str, challenge: &Challenge) -> Result<String, RegistryError> {
        let realm = challenge.param("realm").unwrap_or_default();
        let failed = |reason: String| RegistryError::Token {
            realm: crate::text::bounded_printable(realm, 200),
            reason,
        };
        let mut url = Url::parse(realm).map_err(|e| failed(format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(failed("not an http(s) URL".to_string()));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            match challenge.param("scope") {
                Some(scope) => query.append_pair("scope", scope),
                None => query.append_pair("scope", &format!("repository:{repo}:pull")),
            };
        }
        let mut request = self.http.get(url.clone()).timeout(SMALL_BODY_DEADLINE);
        if let Some((user, password)) = &self.credentials
            && self.credentials_may_go_to(&url)
        {
            request = request.basic_auth(user, Some(password));
        }
        let res = request.send().await.map_err(RegistryError::Transport)?;
        let res = successful(res)
            .await
            .map_err(|e| failed(format!("the realm answered {e}")))?;
        let body = read_capped(res, MAX_TOKEN_BYTES, "token response").await?;
        #[derive(serde::Deserialize)]
        struct TokenBody {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenBody = serde_json::from_slice(&body)
            .map_err(|e| failed(format!("the answer is not a token response: {e}")))?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("the answer has no token".to_string()))?;
        // It goes into a header: visible ASCII only.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(failed(
                "the token has characters a header cannot carry".to_string(),
            ));
        }
        Ok(token)
    }

    /// Credentials leave for a realm only encrypted, or to the registry's own host.
    fn credentials_may_go_to(&self, realm: &Url) -> bool {
        if realm.scheme() == "https" {
            return true;
        }
        let port = realm.port_or_known_default();
        let host = match (realm.host_str(), port) {
            (Some(host), Some(80)) => host.to_string(),
            (Some(host), Some(port)) => format!("{host}:{port}"),
            _ => return false,
        };
        host.eq_ignore_ascii_case(&self.host)
            || (port == Some(80) && format!("{host}:80").eq_ignore_ascii_case(&self.host))
    }
}

/// The response if its status is a success, else its error: the body read up to
/// [`MAX_ERROR_BYTES`] and its messages kept bounded.
async fn successful(mut res: Response) -> Result<Response, RegistryError> {
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = res.chunk().await {
        let room = MAX_ERROR_BYTES as usize - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BYTES as usize {
            break;
        }
    }
    let (codes, message) = error_body(&body);
    Err(RegistryError::Status {
        status: status.as_u16(),
        codes,
        message,
    })
}

/// The codes and messages of a distribution error body
/// (`{"errors":[{"code":..,"message":..}]}`), or its text when it is not one; bounded
/// and printable.
fn error_body(body: &[u8]) -> (Vec<String>, String) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let shown = |text: &str| crate::text::bounded_printable(text.trim(), SHOWN_MESSAGE_CHARS);
    match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => {
            let codes = envelope
                .errors
                .iter()
                .filter_map(|e| e.code.as_deref())
                .take(SHOWN_CODES)
                .map(|c| crate::text::bounded_printable(c, 64))
                .collect();
            let messages: Vec<&str> = envelope
                .errors
                .iter()
                .filter_map(|e| e.message.as_deref())
                .take(SHOWN_CODES)
                .collect();
            (codes, shown(&messages.join("; ")))
        }
        Err(_) => (Vec::new(), shown(&String::from_utf8_lossy(body))),
    }
}

/// The whole body if it is at most `max` bytes; refused before reading when the
/// registry declares more, and as soon as more than `max` arrived otherwise.
async fn read_capped(
    mut res: Response,
    max: u64,
    what: &'static str,
) -> Result<Vec<u8>, RegistryError> {
    let declared = res.content_length();
    if let Some(len) = declared
        && len > max
    {
        return Err(RegistryError::TooLarge {
            what,
            max,
            declared: Some(len),
        });
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = res.chunk().await.map_err(RegistryError::Transport)? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(RegistryError::TooLarge {
                what,
                max,
                declared: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A manifest or index of schema version 2 and a media type hearth reads.
fn parse_manifest(body: &[u8]) -> Result<OciManifest, RegistryError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Versioned {
        schema_version: Option<u64>,
        media_type: Option<String>,
    }
    let bad = |what: String| RegistryError::Manifest(format!("the manifest {what}"));
    let versioned: Versioned =
        serde_json::from_slice(body).map_err(|e| bad(format!("is not a JSON object: {e}")))?;
    if versioned.schema_version != Some(2) {
        return Err(bad(format!(
            "has schema version {}, and only 2 is read",
            versioned
                .schema_version
                .map_or_else(|| "none".to_string(), |v| v.to_string())
        )));
    }
    if let Some(media_type) = versioned.media_type
        && !MANIFEST_TYPES.contains(&media_type.as_str())
    {
        return Err(bad(format!(
            "has media type `{}`, which hearth does not read",
            crate::text::bounded_printable(&media_type, 100)
        )));
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("does not parse: {e}")))
}

/// One challenge of a WWW-Authenticate header: its scheme, lowercased, and its
/// parameters (names lowercased, quoted values unescaped).
#[derive(Debug, PartialEq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every challenge in the response's WWW-Authenticate headers.
fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .collect()
}

/// Parses `Scheme name=value, name="quoted \" value", Other ...` (RFC 9110's
/// challenge list). Whatever does not parse ends the list; nothing here fails.
fn parse_challenges(value: &str) -> Vec<Challenge> {
    let separators = [' ', ','];
    let mut out = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches(separators);
        if rest.is_empty() {
            return out;
        }
        let end = rest.find(separators).unwrap_or(rest.len());
        let mut challenge = Challenge {
            scheme: rest[..end].to_ascii_lowercase(),
            params: Vec::new(),
        };
        rest = &rest[end..];
        loop {
            let candidate = rest.trim_start_matches(separators);
            let name_end = candidate.find(['=', ' ', ',']).unwrap_or(candidate.len());
            if name_end == 0 || !candidate[name_end..].starts_with('=') {
                // The end, or the next challenge's scheme.
                rest = candidate;
                break;
            }
            let name = candidate[..name_end].to_ascii_lowercase();
            let after = &candidate[name_end + 1..];
            let (value, tail) = match after.strip_prefix('"') {
                Some(quoted) => {
                    let mut value = String::new();
                    let mut close = None;
                    let mut chars = quoted.char_indices();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, escaped)) = chars.next() {
                                    value.push(escaped);
                                }
                            }
                            '"' => {
                                close = Some(i + 1);
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    let Some(close) = close else {
                        // Unterminated: keep what came before it.
                        out.push(challenge);
                        return out;
                    };
                    (value, &quoted[close..])
                }
                None => {
                    let end = after.find(separators).unwrap_or(after.len());
                    (after[..end].to_string(), &after[end..])
                }
            };
            challenge.params.push((name, value));
            rest = tail;
        }
        out.push(challenge);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.to_string(),
            params: params
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn challenges_parse_quoted_and_plain_values_and_lists() {
        assert_eq!(
            parse_challenges(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            vec![challenge(
                "bearer",
                &[
                    ("realm", "https://auth.example/token"),
                    ("service", "registry.example"),
                    ("scope", "repository:a/b:pull"),
                ]
            )]
        );
        assert_eq!(
            parse_challenges(r#"Basic realm="a \"b\", c", Bearer realm=x"#),
            vec![
                challenge("basic", &[("realm", "a \"b\", c")]),
                challenge("bearer", &[("realm", "x")]),
            ]
        );
        assert_eq!(parse_challenges("Basic"), vec![challenge("basic", &[])]);
        // Unterminated quote: what came before is kept, nothing panics.
        assert_eq!(
            parse_challenges(r#"Bearer service=s, realm="https://x"#),
            vec![challenge("bearer", &[("service", "s")])]
        );
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges(" , ,").len() <= 1);
    }

    #[test]
    fn manifests_of_another_schema_or_type_are_refused_naming_it() {
        let err = parse_manifest(br#"{"schemaVersion":1}"#).unwrap_err();
        assert!(err.to_string().contains("schema version 1"), "{err}");
        let err =
            parse_manifest(br#"{"schemaVersion":2,"mediaType":"application/x-evil\u001b[2J"}"#)
                .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("application/x-evil"), "{message}");
        assert!(!message.contains('\u{1b}'), "{message}");
        assert!(parse_manifest(b"[1,2]").is_err());
    }

    #[test]
    fn error_bodies_keep_codes_and_bounded_printable_messages() {
        let (codes, message) =
            error_body(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#);
        assert_eq!(codes, vec!["MANIFEST_UNKNOWN".to_string()]);
        assert_eq!(message, "manifest unknown");
        let long = format!("\u{1b}[31m{}", "x".repeat(10_000));
        let (codes, message) = error_body(long.as_bytes());
        assert!(codes.is_empty());
        // Bounded, then escaped: the one escape adds a few characters.
        assert!(
            message.len() <= SHOWN_MESSAGE_CHARS + 8,
            "{}",
            message.len()
        );
        assert!(!message.contains('\u{1b}'));
        let missing = RegistryError::Status {
            status: 404,
            codes: Vec::new(),
            message: String::new(),
        };
        assert!(missing.is_not_found());
        assert_eq!(missing.to_string(), "HTTP 404");
    }

    #[test]
    fn credentials_go_to_https_realms_or_the_registry_itself() {
        let registry = Registry::new(
            "127.0.0.1:5000",
            true,
            Some(("u", "p")),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(registry.credentials_may_go_to(&url("https://auth.example/token")));
        assert!(registry.credentials_may_go_to(&url("http://127.0.0.1:5000/token")));
        assert!(!registry.credentials_may_go_to(&url("http://127.0.0.1:5001/token")));
        assert!(!registry.credentials_may_go_to(&url("http://auth.example/token")));
    }
}
