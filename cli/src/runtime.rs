//! What the command groups that talk to a broker or a cluster share: the async runtime they run
//! on (two worker threads: enrollment issues certificates on blocking threads) and the kube
//! client from the kubeconfig, with errors that say what to fix.

use std::future::Future;

use kube::Client;

use crate::error::{Error, Result};

/// Run `work` to completion on a fresh runtime.
pub fn block_on<F: Future>(work: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Output(format!("starting the async runtime: {e}")))?;
    Ok(runtime.block_on(work))
}

/// A client of the cluster the kubeconfig (or the in-cluster service account) names.
pub async fn kube_client() -> Result<Client> {
    sealed_ota_mqtt::tls::install_crypto_provider();
    Client::try_default().await.map_err(|e| Error::Flag {
        flag: "KUBECONFIG",
        detail: format!("no usable kubeconfig ({e}); set KUBECONFIG or run inside the cluster"),
    })
}
