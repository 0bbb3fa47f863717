//! The operator's HTTP/1.1 listener (hyper): it answers GET requests with what a routing
//! function returns for the path, and nothing else. It serves `/metrics`, `/healthz` and
//! `/readyz` in the operator, and canned firmware in tests. Requests other than GET/HEAD get 405;
//! a client that sends no complete request head within 5 s is dropped.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Value of the `content-type` header.
    pub content_type: &'static str,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// A plain-text reply.
    pub fn text(status: StatusCode, body: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from_static(body.as_bytes()),
        }
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(reply.body));
    *r.status_mut() = reply.status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    r
}

/// Serve connections from `listener` until the task is dropped; `route` maps a request path
/// (without the query) to its reply.
pub async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&str) -> Reply + Clone + Send + Sync + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let reply = if matches!(*req.method(), Method::GET | Method::HEAD) {
                    route(req.uri().path())
                } else {
                    Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n")
                };
                async move { Ok::<_, Infallible>(response(reply)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
