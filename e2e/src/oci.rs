//! The test bed's OCI registry from a test: push a firmware image as an ORAS artifact (the `oras`
//! client the test bed built), and the `kubernetes.io/dockerconfigjson` pull Secret a campaign
//! names. Pushing is what a release pipeline does; the operator pulls with its own client.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::Registry;

/// Media type of a pushed firmware image (the artifact's one file).
pub const FIRMWARE_MEDIA_TYPE: &str = "application/vnd.sealed-ota.firmware.v1";

impl Registry {
    /// `oras push` the file at `image` as `<registry>/<repository>:<tag>` (its only file);
    /// returns the manifest digest (`sha256:...`).
    pub fn push(&self, image: &Path, repository: &str, tag: &str) -> Result<String> {
        let dir = image.parent().context("image path has a directory")?;
        let name = image.file_name().context("image file name")?;
        let reference = format!("{}/{repository}:{tag}", self.addr);
        let out = Command::new(&self.oras)
            .current_dir(dir)
            .args([
                "push",
                "--plain-http",
                "--no-tty",
                "-u",
                &self.user,
                "-p",
                &self.password,
            ])
            .args(["--format", "go-template={{.digest}}"])
            .arg(&reference)
            .arg(format!("{}:{FIRMWARE_MEDIA_TYPE}", name.to_string_lossy()))
            .env("HOME", dir)
            .output()
            .context("running oras")?;
        if !out.status.success() {
            bail!(
                "oras push {reference}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let digest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !digest.starts_with("sha256:") {
            bail!("oras push {reference} printed no digest: {digest:?}");
        }
        Ok(digest)
    }

    /// A `kubernetes.io/dockerconfigjson` Secret `name` with `user:password` for this registry.
    pub async fn pull_secret(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        password: &str,
    ) -> Result<()> {
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", self.user));
        let config = serde_json::json!({"auths": {&self.addr: {"auth": auth}}});
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(
                [(
                    ".dockerconfigjson".to_string(),
                    ByteString(config.to_string().into_bytes()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        Api::<Secret>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }
}
