//! The operator's MQTT session against the test bed's Mosquitto (`eval "$(e2e/testbed env)"`):
//! a dispatcher that reads the inbound queue and answers each message with many publishes must
//! never stall the event loop (at 30,000 devices both replicas stopped reading from the broker
//! for good: the event loop waited for room in a full inbound channel while the dispatcher waited
//! for room in the client's request channel, which only the event loop drains), and a dispatcher
//! that falls behind must not cost the connection (the event loop keeps its keep-alive while the
//! messages wait; before, a 30,000-device run lost the coordinator's connection on an unacked ping
//! once per run).

use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::metrics::Metrics;
use sealed_ota_operator::mqtt::{
    BrokerSettings, InboundQueue, MqttSession, KEEP_ALIVE, MANAGER_RECEIVE_MAXIMUM,
    REQUEST_CHANNEL_CAPACITY,
};
use sealed_ota_protocol::{Action, Outbound};
use tokio::sync::watch;

/// Messages the "devices" send at once.
const SENT: usize = 100;
/// Publishes the dispatcher answers each with (as a replica answers a burst of readies with
/// updates and chunks): together several times the client's request channel.
const ANSWERS: usize = 3 * REQUEST_CHANNEL_CAPACITY / SENT + 1;

/// A unique topic prefix and client-id suffix for one test.
fn tag() -> Result<String> {
    Ok(format!(
        "{:x}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos(),
        std::process::id()
    ))
}

/// The manager's session subscribed to `inbox` on the test bed's broker, connected.
async fn manager(
    bed: &TestBed,
    tag: &str,
    inbox: &str,
    keep_alive: Duration,
    receive_maximum: u16,
    metrics: &Metrics,
) -> Result<(MqttSession, InboundQueue)> {
    let settings = BrokerSettings {
        nodes: vec![TestBed::host_port(&bed.mqtt_url)?],
        tls: None,
        credentials: None,
        client_id: format!("manager-{tag}"),
        keep_alive,
        receive_maximum,
    };
    // The filters never change (the session keeps reading the last value once the sender is gone).
    let (_, filters) = watch::channel(vec![inbox.to_string()]);
    let (mqtt, inbound, _task) = MqttSession::start(settings, filters, metrics.clone());
    assert!(
        mqtt.wait_connected(Duration::from_secs(10)).await,
        "the session did not connect"
    );
    // Let the subscription land before the devices publish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((mqtt, inbound))
}

/// A "device" that publishes `count` numbered QoS 1 messages to `inbox`; its event loop runs in
/// the returned task.
async fn device_sends(
    bed: &TestBed,
    tag: &str,
    inbox: &str,
    count: usize,
) -> Result<tokio::task::JoinHandle<()>> {
    let (device, mut device_loop) = AsyncClient::new(bed.mqtt_options(&format!("dev-{tag}"))?, 256);
    let driver = tokio::spawn(async move {
        while let Ok(event) = device_loop.poll().await {
            if let Event::Incoming(Packet::Disconnect(_)) = event {
                break;
            }
        }
    });
    for n in 0..count {
        device
            .publish(inbox, QoS::AtLeastOnce, false, n.to_be_bytes().to_vec())
            .await?;
    }
    Ok(driver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_answering_a_burst_never_stalls_the_event_loop() -> Result<()> {
    let bed = TestBed::get()?;
    let tag = tag()?;
    let inbox = format!("sealed-ota-test/{tag}/in");
    let outbox = format!("sealed-ota-test/{tag}/out");
    let (mqtt, mut inbound) = manager(
        bed,
        &tag,
        &inbox,
        KEEP_ALIVE,
        MANAGER_RECEIVE_MAXIMUM,
        &Metrics::new(),
    )
    .await?;

    let dispatcher = tokio::spawn(async move {
        for _ in 0..SENT {
            inbound.recv().await.context("inbound queue closed")?;
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

    let driver = device_sends(bed, &tag, &inbox, SENT).await?;
    let dispatched = tokio::time::timeout(Duration::from_secs(60), dispatcher).await;
    driver.abort();
    dispatched
        .context("the dispatcher stalled: the event loop stopped reading the broker")???;
    Ok(())
}

/// The shortest keep-alive rumqttc allows, so that a dispatcher pausing for a few of them is a
/// test of seconds.
const SHORT_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A small in-flight window: the broker holds back the rest of the devices' messages until the
/// dispatcher takes (and so acknowledges) those it sent.
const SMALL_RECEIVE_MAXIMUM: u16 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_falling_behind_keeps_the_connection_and_bounds_its_queue() -> Result<()> {
    let bed = TestBed::get()?;
    let tag = tag()?;
    let inbox = format!("sealed-ota-test/{tag}/in");
    let metrics = Metrics::new();
    let (_mqtt, mut inbound) = manager(
        bed,
        &tag,
        &inbox,
        SHORT_KEEP_ALIVE,
        SMALL_RECEIVE_MAXIMUM,
        &metrics,
    )
    .await?;

    // The devices send; the dispatcher takes nothing for four keep-alives (Mosquitto closes a
    // connection silent for 1.5 of them; rumqttc calls one dead whose PINGRESP it has not read
    // by the next PINGREQ).
    let driver = device_sends(bed, &tag, &inbox, SENT).await?;
    tokio::time::sleep(4 * SHORT_KEEP_ALIVE).await;
    let queued = metrics.mqtt_inbound_queued.get();
    let mut received = Vec::new();
    while received.len() < SENT {
        let msg = tokio::time::timeout(Duration::from_secs(10), inbound.recv())
            .await
            .context("a message the devices sent never came")?
            .context("inbound queue closed")?;
        received.push(usize::from_be_bytes(msg.payload.as_slice().try_into()?));
    }
    driver.abort();
    assert_eq!(
        metrics.mqtt_disconnects.get(),
        0,
        "the connection was lost while the dispatcher was behind"
    );
    assert_eq!(
        queued,
        i64::from(SMALL_RECEIVE_MAXIMUM),
        "while the dispatcher was behind, the queue should hold the broker's whole in-flight window and no more"
    );
    // Every message came: each one taken was acknowledged, so the broker sent the next ones.
    assert_eq!(
        received,
        (0..SENT).collect::<Vec<_>>(),
        "messages lost or reordered"
    );
    assert_eq!(metrics.mqtt_inbound_queued.get(), 0);
    Ok(())
}
