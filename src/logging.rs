//! Logs and traces: the process-wide `tracing` subscriber.
//!
//! The subscriber is a [`Registry`] with up to two layers, each with its own filter:
//!
//! - **Console** (stdout): text, or one flat JSON object per line with
//!   `LOCKSTEP_LOG_FORMAT=json` ([`FlatJson`]). Events follow `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]). The
//!   *context spans* ([`CONTEXT_SPANS`]: `session`, `request`, `node`) are always kept for this
//!   layer, whatever `RUST_LOG` says, so even a `RUST_LOG=warn` line says which session, user,
//!   room and node it is about: JSON lines carry those span fields flattened.
//! - **OTLP** (only when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//!   is set): tracing-opentelemetry with a batch span processor and the OTLP/HTTP span
//!   exporter (`http/protobuf` by default, `http/json` with `OTEL_EXPORTER_OTLP_PROTOCOL`). Its
//!   filter is `LOCKSTEP_TRACE_FILTER` (default `lockstep=info`), independent of `RUST_LOG`, so
//!   every `lockstep::…` span at info (sessions, requests, Redis scripts, audit batches) is
//!   exported even when the console shows warnings only. The long-lived `node` span is never
//!   exported: background work (audit drains, sweeps) forms traces of its own.
//!
//! The exporter's HTTP client is hyper (already in the tree through axum): no gRPC stack, no
//! TLS stack. The SDK's batch processor exports from a thread of its own, outside the tokio
//! runtime, and hyper needs the runtime, so each export request is spawned on the runtime
//! that was current at [`init`] ([`OnRuntime`]).
//!
//! [`init`] is `try_init`-safe: tests that start many nodes in one process call it once per
//! node and all but the first call are no-ops. `node_id` is therefore never a global: it
//! comes from the span chain (`session`, `request` and `node` spans carry it), and from the
//! OTLP resource of a process, which is one node in production.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogFormat;

/// Spans that give log lines their context; kept for the console whatever `RUST_LOG` says.
pub const CONTEXT_SPANS: [&str; 3] = ["session", "request", "node"];

/// The console filter when `RUST_LOG` is unset (the SDK's own lifecycle notes are noise).
pub const DEFAULT_LOG_FILTER: &str = "info,opentelemetry_sdk=warn";

/// The OTLP layer's filter when `LOCKSTEP_TRACE_FILTER` is unset.
pub const DEFAULT_TRACE_FILTER: &str = "lockstep=info";

/// Owns the tracer provider; [`shutdown`](Self::shutdown) exports what is still buffered.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the span exporter (bounded by the exporter's timeout). The SDK's
    /// shutdown blocks until its export thread is done, and that export runs on this runtime:
    /// so it is called from a blocking thread, leaving the runtime's workers free.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("lockstep: trace exporter shutdown: {e}"),
            Err(e) => eprintln!("lockstep: trace exporter shutdown failed: {e}"),
        }
    }
}

/// Why OTLP export could not be set up (the gateway runs on without it).
#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error(
        "OTEL_EXPORTER_OTLP_PROTOCOL={0} is not built in: use http/protobuf (port 4318) or http/json"
    )]
    Protocol(String),
    #[error("LOCKSTEP_TRACE_FILTER is invalid: {0}")]
    Filter(String),
    #[error("OTLP export needs a tokio runtime")]
    NoRuntime,
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Installs the global subscriber: console logs in `format`, and OTLP span export when the
/// standard OpenTelemetry environment asks for it. `node_id` goes into the OTLP resource.
/// Later calls in the same process change nothing (and export nothing).
pub fn init(format: LogFormat, node_id: &str) -> Telemetry {
    let console = console_layer(format);
    let (otlp, provider, problem) = if otlp_wanted() {
        match otlp_layer(node_id) {
            Ok((layer, provider)) => (Some(layer), Some(provider), None),
            Err(e) => (None, None, Some(e)),
        }
    } else {
        (None, None, None)
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![console];
    layers.extend(otlp);
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if !installed {
        // Another node of this process installed the subscriber first.
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
        return Telemetry { provider: None };
    }
    if let Some(e) = problem {
        tracing::error!(error = %e, "traces are NOT exported");
    } else if provider.is_some() {
        let endpoint = endpoint_for_log();
        tracing::info!(%endpoint, "exporting traces over OTLP");
        if endpoint.trim_start().starts_with("https:") {
            tracing::warn!(
                "the OTLP exporter speaks plain HTTP only, so exports to an https:// endpoint \
                 fail: send to a collector agent or sidecar over http://"
            );
        }
    }
    Telemetry { provider }
}

/// The console filter: `RUST_LOG` (default `info`), plus the context spans at info.
fn console_filter() -> impl tracing_subscriber::layer::Filter<Registry> + Send + Sync {
    let env =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let context = filter_fn(|m| {
        m.is_span()
            && *m.level() <= tracing::Level::INFO
            && m.target().starts_with("lockstep")
            && CONTEXT_SPANS.contains(&m.name())
    })
    // The hint keeps the global maximum level at `RUST_LOG`'s, so disabled `debug!`/`trace!`
    // call sites (the cursor path's) stay a single comparison.
    .with_max_level_hint(LevelFilter::INFO);
    env.or(context)
}

fn console_layer(format: LogFormat) -> Box<dyn Layer<Registry> + Send + Sync> {
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_filter(console_filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_filter(console_filter())
            .boxed(),
    }
}

/// Whether the environment asks for OTLP traces.
fn otlp_wanted() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn endpoint_for_log() -> String {
    std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or_default()
}

fn otlp_layer(
    node_id: &str,
) -> Result<(Box<dyn Layer<Registry> + Send + Sync>, SdkTracerProvider), TraceSetupError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};

    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    let protocol = match protocol.trim().to_ascii_lowercase().as_str() {
        "" | "http/protobuf" => opentelemetry_otlp::Protocol::HttpBinary,
        "http/json" => opentelemetry_otlp::Protocol::HttpJson,
        other => return Err(TraceSetupError::Protocol(other.to_owned())),
    };
    let filter = otlp_filter(std::env::var("LOCKSTEP_TRACE_FILTER").ok().as_deref())?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TraceSetupError::NoRuntime)?;
    let client = OnRuntime {
        client: Arc::new(
            opentelemetry_http::hyper::HyperClient::with_default_connector(export_timeout(), None),
        ),
        runtime,
    };
    // Endpoint, headers, timeout and compression come from the standard OTEL_EXPORTER_OTLP_*
    // variables, read by the builder.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_http_client(client)
        .build()
        .map_err(|e| TraceSetupError::Exporter(e.to_string()))?;
    // The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (SDK default:
    // parentbased_always_on), the batch settings from OTEL_BSP_*.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(node_id))
        .build();
    let tracer = provider.tracer("lockstep");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Per-poll bookkeeping (busy/idle time, thread ids, activating an OpenTelemetry
        // context for other OpenTelemetry instrumentation, of which there is none) is not
        // worth its cost: session spans are entered at every poll of their task.
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_context_activation(false)
        .with_filter(filter)
        .boxed();
    Ok((layer, provider))
}

/// What the OTLP layer sees: `spec` (`LOCKSTEP_TRACE_FILTER`, default [`DEFAULT_TRACE_FILTER`]),
/// never the `node` span: that long-lived span would make all background work one endless
/// trace.
fn otlp_filter(
    spec: Option<&str>,
) -> Result<impl tracing_subscriber::layer::Filter<Registry> + Send + Sync + use<>, TraceSetupError>
{
    let env = match spec.map(str::trim) {
        Some(s) if !s.is_empty() => EnvFilter::builder()
            .parse(s)
            .map_err(|e| TraceSetupError::Filter(e.to_string()))?,
        _ => EnvFilter::new(DEFAULT_TRACE_FILTER),
    };
    let not_node =
        filter_fn(|m| !(m.is_span() && m.name() == "node")).with_max_level_hint(LevelFilter::TRACE);
    Ok(env.and(not_node))
}

/// `service.name` (from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, else `lockstep`),
/// `service.version`, `service.instance.id` and `node_id`.
fn resource(node_id: &str) -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name("lockstep");
    }
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", node_id.to_owned()),
            KeyValue::new("node_id", node_id.to_owned()),
        ])
        .build()
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT` in ms, default 10 s.
fn export_timeout() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse::<u64>().ok())
    .map(Duration::from_millis)
    .unwrap_or(Duration::from_secs(10))
}

/// Runs each export request on the tokio runtime: the batch processor's own thread has none,
/// and hyper needs one.
#[derive(Debug)]
struct OnRuntime {
    client: Arc<opentelemetry_http::hyper::HyperClient>,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: axum::http::Request<bytes::Bytes>,
    ) -> Result<axum::http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}

/// One JSON object per line: `timestamp`, `level`, `target`, the fields of every span in the
/// event's scope (outermost first, so an inner span's field wins), `span` (the innermost
/// span's name), then the event's own fields (`message` and the rest), which win over span
/// fields of the same name. The fields of spans are stored as JSON by [`JsonFields`].
struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::Value;
        let meta = event.metadata();
        let mut obj = serde_json::Map::new();
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        obj.insert("timestamp".into(), Value::String(ts));
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields)
                {
                    obj.extend(map);
                }
                innermost = Some(span.name());
            }
            if let Some(name) = innermost {
                obj.insert("span".into(), name.into());
            }
        }
        event.record(&mut JsonVisitor(&mut obj));
        let line = serde_json::to_string(&obj).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Collects an event's fields into a JSON map (numbers and booleans kept as such).
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::span::{Attributes, Id};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    use super::*;

    /// Records `target/name` of every span it is told about.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            let m = attrs.metadata();
            self.0
                .lock()
                .unwrap()
                .push(format!("{}/{}", m.target(), m.name()));
        }
    }

    fn seen_through(spec: Option<&str>, emit: impl FnOnce()) -> Vec<String> {
        let seen = Seen::default();
        let filter = otlp_filter(spec).expect("filter");
        let subscriber = tracing_subscriber::registry().with(seen.clone().with_filter(filter));
        tracing::subscriber::with_default(subscriber, emit);
        seen.0.lock().unwrap().clone()
    }

    fn emit_all() {
        // What the Redis wrapper opens around every engine call, from its own module.
        let _redis =
            tracing::info_span!(target: "lockstep::engine::redis::locks", "redis", op = "x");
        let _node = tracing::info_span!(target: "lockstep::node", "node", node_id = "n");
        let _request = tracing::info_span!(target: "lockstep::session", "request");
        let _cursor = tracing::trace_span!(target: "lockstep::session", "request");
        let _dep = tracing::info_span!(target: "hyper::client", "connect");
    }

    #[test]
    fn the_otlp_layer_gets_lockstep_info_spans_but_not_the_node_span() {
        let seen = seen_through(None, emit_all);
        assert_eq!(
            seen,
            [
                "lockstep::engine::redis::locks/redis",
                "lockstep::session/request"
            ]
        );
    }

    #[test]
    fn the_trace_filter_can_add_cursor_spans_and_never_the_node_span() {
        let seen = seen_through(Some("lockstep=trace"), emit_all);
        assert_eq!(
            seen,
            [
                "lockstep::engine::redis::locks/redis",
                "lockstep::session/request",
                "lockstep::session/request"
            ]
        );
        assert!(otlp_filter(Some("lockstep=nonsense[")).is_err());
    }
}
