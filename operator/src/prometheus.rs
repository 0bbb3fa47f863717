//! The metrics gate's Prometheus client: an instant query against the HTTP API
//! (`GET <url>/api/v1/query?query=...`), fetched by the operator's one HTTP client
//! ([`crate::fetch`]) and parsed here into samples (pure) for [`crate::gates`] to judge. The URL is
//! never logged (it may carry credentials); errors say what failed.

use std::time::Duration;

use crate::gates::MetricResult;

/// How long one query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest Prometheus answer read (an instant query of one scalar is a few hundred bytes).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The instant-query URL of `query` against the Prometheus at `base`.
pub fn query_url(base: &str, query: &str) -> String {
    let encoded: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", query)
        .finish();
    format!("{}/api/v1/query?{encoded}", base.trim_end_matches('/'))
}

/// Run `query` against the Prometheus at `base`.
pub async fn instant_query(base: &str, query: &str) -> MetricResult {
    match crate::fetch::fetch(&query_url(base, query), MAX_RESPONSE_BYTES, QUERY_TIMEOUT).await {
        Ok(body) => match parse(&body) {
            Ok(samples) => MetricResult::Samples(samples),
            Err(e) => MetricResult::Error(e),
        },
        Err(e) => MetricResult::Error(format!(
            "Prometheus at spec.rollout.gate.metrics.prometheusUrl: {e}"
        )),
    }
}

/// The samples of an instant query's JSON answer: each (labels as `{k="v",...}`, value). A
/// vector gives one per series, a scalar one without labels; an error answer is its message.
pub fn parse(body: &[u8]) -> Result<Vec<(String, f64)>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            v["errorType"].as_str().unwrap_or("an error"),
            v["error"].as_str().unwrap_or("no detail")
        ));
    }
    let value = |pair: &serde_json::Value| -> Result<f64, String> {
        pair.get(1)
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| format!("a sample without a number: {pair}"))
    };
    let data = &v["data"];
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .ok_or("a vector without result")?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        let inner: Vec<String> =
                            m.iter().map(|(k, v)| format!("{k}={}", v)).collect();
                        format!("{{{}}}", inner.join(","))
                    })
                    .unwrap_or_default();
                Ok((labels, value(&s["value"])?))
            })
            .collect(),
        Some("scalar") => Ok(vec![(String::new(), value(&data["result"])?)]),
        other => Err(format!(
            "the query must return a vector or a scalar, not {}",
            other.unwrap_or("nothing")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_url_encoded() {
        assert_eq!(
            query_url("http://p:9090/", "sum(rate(x{a=\"b c\"}[1m])) > 0"),
            "http://p:9090/api/v1/query?query=sum%28rate%28x%7Ba%3D%22b+c%22%7D%5B1m%5D%29%29+%3E+0"
        );
    }

    #[test]
    fn vectors_scalars_and_errors_parse() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"job":"emulator"},"value":[1700000000.1,"0.25"]},
            {"metric":{},"value":[1700000000.1,"NaN"]}]}}"#;
        let s = parse(vector).unwrap();
        assert_eq!(s[0], ("{job=\"emulator\"}".to_owned(), 0.25));
        assert!(s[1].1.is_nan());
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
        assert_eq!(parse(scalar).unwrap(), vec![(String::new(), 3.0)]);
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        assert!(parse(error).unwrap_err().contains("parse error at char 3"));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse(matrix).unwrap_err().contains("matrix"));
        assert!(parse(b"<html>").is_err());
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse(empty).unwrap(), vec![]);
    }
}
