//! Smoke tests of the test bed's two real parts: the kube-apiserver (through `kube::Client`)
//! and Mosquitto's TLS listener (through `rumqttc::v5`, with the MQTT 5 properties the
//! protocol relies on).

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_e2e::TestBed;

#[tokio::test]
async fn configmap_round_trips_through_the_real_apiserver() -> Result<()> {
    let bed = TestBed::get()?;
    let ns = bed.namespace("smoke").await?;
    let api: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("firmware".into()),
            ..ObjectMeta::default()
        },
        data: Some([("version".to_string(), "1.1.0".to_string())].into()),
        ..ConfigMap::default()
    };
    api.create(&PostParams::default(), &cm).await?;
    let read = api.get("firmware").await?;
    assert_eq!(read.data.unwrap()["version"], "1.1.0");
    assert!(read.metadata.uid.is_some(), "the apiserver assigns a uid");
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn mqtt5_properties_survive_the_tls_listener() -> Result<()> {
    let bed = TestBed::get()?;
    let topic = format!("iot/smoke/{}/notify", std::process::id());
    let (subscriber, mut sub_loop) = AsyncClient::new(
        bed.mqtts_options("smoke-sub", &bed.client_cert, &bed.client_key)?,
        16,
    );
    subscriber.subscribe(&topic, QoS::AtLeastOnce).await?;
    // Wait for SUBACK before publishing so the message cannot be missed.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await
    .context("no SUBACK within 10 s")??;

    let (publisher, mut pub_loop) = AsyncClient::new(
        bed.mqtts_options("smoke-pub", &bed.client_cert, &bed.client_key)?,
        16,
    );
    let properties = PublishProperties {
        response_topic: Some("iot/smoke/ready".into()),
        correlation_data: Some(b"campaign-7".to_vec().into()),
        user_properties: vec![("sealed-ota-version".into(), "1".into())],
        ..PublishProperties::default()
    };
    publisher
        .publish_with_properties(&topic, QoS::AtLeastOnce, false, "hello", properties)
        .await?;
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });

    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = sub_loop.poll().await? {
                return Ok::<_, anyhow::Error>(p);
            }
        }
    })
    .await
    .context("no PUBLISH within 10 s")??;
    assert_eq!(&received.payload[..], b"hello");
    let props = received
        .properties
        .context("publish arrived without properties")?;
    assert_eq!(props.response_topic.as_deref(), Some("iot/smoke/ready"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"campaign-7"[..]));
    assert_eq!(
        props.user_properties,
        vec![("sealed-ota-version".to_string(), "1".to_string())]
    );
    Ok(())
}
