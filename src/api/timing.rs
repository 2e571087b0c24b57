//! Times every API call by method for `hearth_api_request_duration_seconds`: a tower
//! layer under tonic's router, from the request's arrival to its response headers.
//!
//! The method label comes from a closed set, the methods in the descriptors the daemon
//! serves; any other path (a typo, a probe, a hostile client) is counted as `other`, so
//! callers cannot grow the series.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;

/// The layer: wraps each service the server builds.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimingLayer;

impl<S> tower::Layer<S> for TimingLayer {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Timed<S> {
        Timed { inner }
    }
}

/// A service whose calls are timed.
#[derive(Clone, Debug)]
pub struct Timed<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let clock = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await;
            let took = clock.elapsed();
            crate::metrics::api_call(method, took);
            tracing::debug!(method, took_ms = took.as_secs_f64() * 1000.0, "answered");
            response
        })
    }
}

/// `Service/Method` for a path the daemon serves (`/pkg.Service/Method`), else `other`.
pub fn method_label(path: &str) -> &'static str {
    static METHODS: OnceLock<HashMap<String, &'static str>> = OnceLock::new();
    let methods = METHODS.get_or_init(|| {
        let mut methods = HashMap::new();
        for encoded in [
            super::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    for method in service.method {
                        let method = method.name.unwrap_or_default();
                        let path = format!("/{package}.{name}/{method}");
                        // Leaked once per method the daemon serves: a fixed, small set.
                        let label: &'static str =
                            Box::leak(format!("{name}/{method}").into_boxed_str());
                        methods.insert(path, label);
                    }
                }
            }
        }
        methods
    });
    methods.get(path).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_are_named_and_the_rest_is_other() {
        assert_eq!(
            method_label("/hearth.v1.MachineService/CreateMachine"),
            "MachineService/CreateMachine"
        );
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(method_label("/hearth.v1.MachineService/Nope"), "other");
        assert_eq!(method_label("/../etc/passwd"), "other");
    }
}
