//! Carrying the partial transaction through gRPC metadata.
//!
//! A composite service calls each domain service "inside" one participant
//! of its composite transaction. The context travels as metadata, never in
//! the request message, so a domain service's API needs no TCC fields:
//!
//! | metadata key          | value                                  |
//! |-----------------------|----------------------------------------|
//! | `tcc-partial-id`      | the participant's partial id           |
//! | `tcc-transaction-id`  | the composite transaction id           |
//! | `tcc-deadline-ms`     | the transaction deadline (unix ms)     |
//!
//! * Client side: [`PropagateInterceptor`] adds the context of the current
//!   task, set with [`within`]; or [`attach`] adds it to one request.
//! * Server side: [`ExtractInterceptor`] validates the metadata and stores a
//!   [`PartialContext`] in the request's extensions; handlers ask
//!   [`partial_of`] "am I inside a composite transaction, and which?".

use std::future::Future;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

/// Metadata key of the partial transaction id.
pub const PARTIAL_ID: &str = "tcc-partial-id";
/// Metadata key of the composite transaction id.
pub const TRANSACTION_ID: &str = "tcc-transaction-id";
/// Metadata key of the transaction deadline (unix ms).
pub const DEADLINE_MS: &str = "tcc-deadline-ms";

/// Which partial transaction a call belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialContext {
    /// The partial transaction id (the topic to publish to).
    pub partial_id: String,
    /// The composite transaction id.
    pub transaction_id: String,
    /// When the coordinator cancels the transaction if still undecided
    /// (unix ms).
    pub deadline_ms: i64,
}

impl PartialContext {
    /// Writes the context into request metadata.
    pub fn write(&self, md: &mut MetadataMap) {
        for (key, value) in [
            (PARTIAL_ID, self.partial_id.clone()),
            (TRANSACTION_ID, self.transaction_id.clone()),
            (DEADLINE_MS, self.deadline_ms.to_string()),
        ] {
            if let Ok(v) = MetadataValue::try_from(value) {
                md.insert(key, v);
            }
        }
    }

    /// Reads the context from metadata: `Ok(None)` when the call is not
    /// part of a composite transaction, `Err` when the metadata is there but
    /// malformed.
    pub fn read(md: &MetadataMap) -> Result<Option<Self>, String> {
        let Some(partial) = md.get(PARTIAL_ID) else { return Ok(None) };
        let text = |key: &str, v: Option<&MetadataValue<tonic::metadata::Ascii>>| -> Result<String, String> {
            let v = v.ok_or_else(|| format!("{key} metadata is missing"))?;
            let s = v.to_str().map_err(|_| format!("{key} metadata is not ASCII"))?;
            if s.is_empty() || s.len() > 64 {
                return Err(format!("{key} metadata has a bad length"));
            }
            Ok(s.to_string())
        };
        let partial_id = text(PARTIAL_ID, Some(partial))?;
        let transaction_id = text(TRANSACTION_ID, md.get(TRANSACTION_ID))?;
        let deadline_ms = text(DEADLINE_MS, md.get(DEADLINE_MS))?
            .parse::<i64>()
            .map_err(|_| format!("{DEADLINE_MS} metadata is not an integer"))?;
        Ok(Some(PartialContext { partial_id, transaction_id, deadline_ms }))
    }
}

tokio::task_local! {
    static CURRENT: PartialContext;
}

/// Runs `f` with `ctx` as the current partial: every call made through a
/// client with [`PropagateInterceptor`] inside `f` carries it.
pub async fn within<F: Future>(ctx: PartialContext, f: F) -> F::Output {
    CURRENT.scope(ctx, f).await
}

/// Adds `ctx` to one request.
pub fn attach<T>(request: &mut Request<T>, ctx: &PartialContext) {
    ctx.write(request.metadata_mut());
}

/// Client interceptor: adds the current task's partial context (see
/// [`within`]) to every outgoing request, and the current span's trace
/// context (see [`crate::telemetry`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateInterceptor;

impl tonic::service::Interceptor for PropagateInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let _ = CURRENT.try_with(|ctx| ctx.write(request.metadata_mut()));
        crate::telemetry::inject(request.metadata_mut());
        Ok(request)
    }
}

/// Server interceptor: validates the transaction metadata (INVALID_ARGUMENT
/// if malformed) and makes it available through [`partial_of`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtractInterceptor;

impl tonic::service::Interceptor for ExtractInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match PartialContext::read(request.metadata()) {
            Ok(Some(ctx)) => {
                request.extensions_mut().insert(ctx);
                Ok(request)
            }
            Ok(None) => Ok(request),
            Err(e) => Err(Status::invalid_argument(e)),
        }
    }
}

/// The partial transaction a request belongs to, if any (requires
/// [`ExtractInterceptor`] on the server).
pub fn partial_of<T>(request: &Request<T>) -> Option<&PartialContext> {
    request.extensions().get::<PartialContext>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn ctx() -> PartialContext {
        PartialContext { partial_id: "p-1".into(), transaction_id: "t-1".into(), deadline_ms: 42 }
    }

    #[tokio::test]
    async fn propagates_from_task_local_to_extensions() {
        let outgoing = within(ctx(), async { PropagateInterceptor.call(Request::new(())) }).await;
        let Ok(outgoing) = outgoing else { panic!("interceptor failed") };
        let incoming = Request::from_parts(outgoing.metadata().clone(), Default::default(), ());
        let Ok(incoming) = ExtractInterceptor.call(incoming) else { panic!("extract failed") };
        assert_eq!(partial_of(&incoming), Some(&ctx()));
    }

    #[test]
    fn outside_a_transaction_nothing_is_added() {
        let Ok(r) = PropagateInterceptor.call(Request::new(())) else { panic!() };
        assert!(r.metadata().get(PARTIAL_ID).is_none());
        let Ok(r) = ExtractInterceptor.call(r) else { panic!() };
        assert!(partial_of(&r).is_none());
    }

    #[test]
    fn malformed_metadata_is_invalid_argument() {
        let mut r = Request::new(());
        r.metadata_mut().insert(PARTIAL_ID, MetadataValue::from_static("p"));
        let err = ExtractInterceptor.call(r).err().map(|s| s.code());
        assert_eq!(err, Some(tonic::Code::InvalidArgument));
    }
}
