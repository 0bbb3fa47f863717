//! The device side of Sealed OTA on a microcontroller (`no_std` + `alloc`): a
//! [`DeviceSession`] driven over [minimq](https://docs.rs/minimq), an MQTT 5 client for `no_std`.
//! This crate owns only the mapping between minimq's publications and the protocol's plain
//! [`Inbound`]/[`Action`] values; the board owns the TCP (and TLS) transport, the clock, the
//! hardware RNG, the flash slots and the persistence of [`DeviceSession::state`].
//!
//! The four MQTT 5 features the protocol uses all map one to one: Response Topic, Correlation
//! Data, User Properties (the wire version) and Content Type on every PUBLISH, and the device's
//! Maximum Packet Size, which minimq announces in CONNECT from the size of its receive buffer (it
//! must equal [`DeviceConfig::max_packet_size`](sealed_ota_protocol::DeviceConfig)).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::vec::Vec;

use minimq::{
    Connection, InboundPublish, Io, Property, Publication, QoS, SubscriptionOptions, TopicFilter,
};
use sealed_ota_protocol::rand_core::CryptoRngCore;
use sealed_ota_protocol::{
    Action, DeviceConfig, DeviceOutput, DeviceSession, DeviceState, Inbound, Properties,
    ProtocolError,
};

/// What failed on the MQTT connection while carrying out the session's actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// minimq refused or failed the SUBSCRIBE.
    Subscribe,
    /// minimq refused or failed the UNSUBSCRIBE.
    Unsubscribe,
    /// minimq refused or failed the PUBLISH (for example larger than the broker's maximum).
    Publish,
}

/// A session for this device, drawing its randomness (ephemeral keys, nonces) from `rng`: on a
/// board, its hardware RNG or a CSPRNG seeded from it. Carry out the returned actions (the
/// subscription) with [`perform`].
pub fn open_session(
    config: DeviceConfig,
    state: DeviceState,
    rng: impl CryptoRngCore + Send + 'static,
) -> (DeviceSession, Vec<Action>) {
    DeviceSession::with_rng(config, state, Box::new(rng))
}

/// A minimq PUBLISH as the protocol's [`Inbound`], with the properties the protocol checks.
pub fn inbound(publish: &InboundPublish<'_>) -> Inbound {
    let mut properties = Properties::default();
    // A malformed property is skipped: every property is a broker-alterable hint, and the
    // session authenticates what matters inside the payload.
    for property in publish.properties().iter().flatten() {
        match property {
            Property::ResponseTopic(topic) => properties.response_topic = Some(topic.to_string()),
            Property::CorrelationData(data) => properties.correlation_data = Some(data.to_vec()),
            Property::UserProperty(key, value) => properties
                .user_properties
                .push((key.to_string(), value.to_string())),
            Property::ContentType(kind) => properties.content_type = Some(kind.to_string()),
            _ => {}
        }
    }
    Inbound {
        topic: publish.topic().to_string(),
        payload: publish.payload().to_vec(),
        properties,
    }
}

/// Feed one received PUBLISH to the session (at `now`, Unix seconds from the board's clock) and
/// carry out what it asks on the connection. The events (chunks to write to the inactive slot,
/// image complete, rejections) go back to the caller.
pub async fn on_publish<IO: Io>(
    session: &mut DeviceSession,
    connection: &mut Connection<'_, '_, IO>,
    publish: &InboundPublish<'_>,
    now: u64,
) -> Result<Result<DeviceOutput, ProtocolError>, LinkError> {
    let output = match session.handle(&inbound(publish), now) {
        Ok(output) => output,
        // Rejected message: the session is unchanged and nothing is sent.
        Err(e) => return Ok(Err(e)),
    };
    for action in &output.actions {
        perform(connection, action).await?;
    }
    Ok(Ok(output))
}

/// Carry out one [`Action`] on a minimq connection (QoS 1 everywhere, as the protocol expects).
pub async fn perform<IO: Io>(
    connection: &mut Connection<'_, '_, IO>,
    action: &Action,
) -> Result<(), LinkError> {
    match action {
        Action::Subscribe(filters) => {
            let options = SubscriptionOptions::default().maximum_qos(QoS::AtLeastOnce);
            let topics: Vec<TopicFilter<'_>> = filters
                .iter()
                .map(|f| TopicFilter::new(f).options(options))
                .collect();
            connection
                .subscribe(&topics, &[])
                .await
                .map_err(|_| LinkError::Subscribe)?;
        }
        Action::Unsubscribe(filters) => {
            let topics: Vec<&str> = filters.iter().map(|f| f.as_str()).collect();
            connection
                .unsubscribe(&topics, &[])
                .await
                .map_err(|_| LinkError::Unsubscribe)?;
        }
        Action::Publish(out) => {
            let props = &out.properties;
            let mut properties: Vec<Property<'_>> = Vec::new();
            if let Some(topic) = &props.response_topic {
                properties.push(Property::ResponseTopic(topic));
            }
            if let Some(data) = &props.correlation_data {
                properties.push(Property::CorrelationData(data));
            }
            for (key, value) in &props.user_properties {
                properties.push(Property::UserProperty(key, value));
            }
            if let Some(kind) = &props.content_type {
                properties.push(Property::ContentType(kind));
            }
            let mut publication = Publication::bytes(&out.topic, &out.payload)
                .qos(QoS::AtLeastOnce)
                .properties(&properties);
            if out.retain {
                publication = publication.retain();
            }
            connection
                .publish(publication)
                .await
                .map_err(|_| LinkError::Publish)?;
        }
    }
    Ok(())
}
