//! The operator's MQTT session against the test bed's Mosquitto (`eval "$(e2e/testbed env)"`):
//! a dispatcher that reads the inbound channel and answers each message with many publishes must
//! never stall the event loop. At 30,000 devices both replicas stopped reading from the broker
//! for good: the event loop waited for room in the full inbound channel while the dispatcher
//! waited for room in the client's request channel, which only the event loop drains.

use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::metrics::Metrics;
use sealed_ota_operator::mqtt::{BrokerSettings, MqttSession, REQUEST_CHANNEL_CAPACITY};
use sealed_ota_protocol::{Action, Outbound};
use tokio::sync::{mpsc, watch};

/// Messages the "devices" send at once.
const SENT: usize = 100;
/// Publishes the dispatcher answers each with (as a replica answers a burst of readies with
/// updates and chunks): together several times the client's request channel.
const ANSWERS: usize = 3 * REQUEST_CHANNEL_CAPACITY / SENT + 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_answering_a_burst_never_stalls_the_event_loop() -> Result<()> {
    let bed = TestBed::get()?;
    let tag = format!(
        "{:x}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos(),
        std::process::id()
    );
    let inbox = format!("sealed-ota-test/{tag}/in");
    let outbox = format!("sealed-ota-test/{tag}/out");
    let settings = BrokerSettings {
        nodes: vec![TestBed::host_port(&bed.mqtt_url)?],
        tls: None,
        credentials: None,
        client_id: format!("dispatch-{tag}"),
    };
    let (_filters_tx, filters) = watch::channel(vec![inbox.clone()]);
    // One message of room: the event loop waits for the dispatcher at every message, as it does
    // once a burst fills the operator's 16,384.
    let (inbound_tx, mut inbound_rx) = mpsc::channel(1);
    let (mqtt, _task) = MqttSession::start(settings, filters, inbound_tx, Metrics::new());
    assert!(
        mqtt.wait_connected(Duration::from_secs(10)).await,
        "the session did not connect"
    );
    // Let the subscription land before the burst.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dispatcher = tokio::spawn(async move {
        for _ in 0..SENT {
            inbound_rx.recv().await.context("inbound channel closed")?;
            let answers = (0..ANSWERS)
                .map(|_| {
                    Action::Publish(Outbound {
                        topic: outbox.clone(),
                        payload: vec![0; 16],
                        retain: false,
                        properties: Default::default(),
                    })
                })
                .collect();
            mqtt.execute_detached(answers)?;
        }
        Ok::<_, anyhow::Error>(())
    });

    let (device, mut device_loop) = AsyncClient::new(bed.mqtt_options(&format!("dev-{tag}"))?, 256);
    let driver = tokio::spawn(async move {
        while let Ok(event) = device_loop.poll().await {
            if let Event::Incoming(Packet::Disconnect(_)) = event {
                break;
            }
        }
    });
    for n in 0..SENT {
        device
            .publish(&inbox, QoS::AtLeastOnce, false, n.to_be_bytes().to_vec())
            .await?;
    }
    let dispatched = tokio::time::timeout(Duration::from_secs(60), dispatcher).await;
    driver.abort();
    dispatched
        .context("the dispatcher stalled: the event loop stopped reading the broker")???;
    Ok(())
}
