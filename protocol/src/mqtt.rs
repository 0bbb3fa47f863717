//! Plain-data view of MQTT 5 messages: what the sessions consume and produce. No client library and
//! no I/O here; the operator and the emulator map these to their MQTT client. QoS is always 1.

use crate::prelude::*;

use crate::error::ProtocolError;
use crate::WIRE_VERSION;

/// The MQTT 5 properties the protocol uses. All of them are broker-alterable hints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    /// Response Topic.
    pub response_topic: Option<String>,
    /// Correlation Data.
    pub correlation_data: Option<Vec<u8>>,
    /// User Properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// Content Type.
    pub content_type: Option<String>,
}

/// A received PUBLISH.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inbound {
    /// Topic name.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Properties.
    pub properties: Properties,
}

/// A PUBLISH to send (QoS 1).
#[derive(Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Topic name.
    pub topic: String,
    /// Payload bytes. Empty with `retain` clears a retained message.
    pub payload: Vec<u8>,
    /// Retain flag.
    pub retain: bool,
    /// Properties.
    pub properties: Properties,
}

impl core::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Payloads are ciphertext or signed public data, but can be large: print the length only.
        f.debug_struct("Outbound")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("retain", &self.retain)
            .field("properties", &self.properties)
            .finish()
    }
}

impl Outbound {
    /// View as an [`Inbound`] (what a subscriber receives), for tests and in-memory brokers.
    pub fn to_inbound(&self) -> Inbound {
        Inbound {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            properties: self.properties.clone(),
        }
    }
}

/// Something the caller must do on the MQTT connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH at QoS 1.
    Publish(Outbound),
    /// One SUBSCRIBE with these topic filters (QoS 1).
    Subscribe(Vec<String>),
    /// One UNSUBSCRIBE with these topic filters.
    Unsubscribe(Vec<String>),
}

/// User Property naming the wire version.
pub const VERSION_PROPERTY: &str = "sealed-ota-version";
/// Content type of every protocol payload.
pub const CONTENT_TYPE: &str = "application/vnd.sealed-ota.v2+cbor";

/// Compare broker-alterable hints with authenticated values; a present but different hint is a
/// typed error. Absent hints are fine (a broker may strip properties).
#[cfg(any(feature = "device", feature = "manager"))]
pub(crate) fn check_hints(
    props: &Properties,
    expected_response_topic: Option<&str>,
    session_id: &[u8; 16],
) -> Result<(), ProtocolError> {
    if let (Some(got), Some(exp)) = (props.response_topic.as_deref(), expected_response_topic) {
        if got != exp {
            return Err(ProtocolError::HintMismatch {
                field: "response_topic",
            });
        }
    }
    if let Some(cd) = &props.correlation_data {
        if cd.as_slice() != session_id {
            return Err(ProtocolError::HintMismatch {
                field: "correlation_data",
            });
        }
    }
    for (k, v) in &props.user_properties {
        if k == VERSION_PROPERTY && v != &WIRE_VERSION.to_string() {
            return Err(ProtocolError::HintMismatch {
                field: "user_property sealed-ota-version",
            });
        }
    }
    Ok(())
}
