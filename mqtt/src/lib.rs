//! The one seam between the protocol's plain-data MQTT view ([`Inbound`], [`Outbound`],
//! [`Action`], [`Properties`]) and rumqttc's v5 client, shared by the operator, the device
//! emulator, the device agent and the tests. It owns broker URL parsing ([`BrokerUrl`]), the
//! rustls client configuration ([`tls`]), property conversion both ways and the execution of a
//! session's actions ([`perform`]), the reading of a SUBACK's refusals and the subscription that
//! makes up for them ([`refused`], [`resubscribe`]), and the broker probe ([`probe`]) that checks a broker for
//! every MQTT 5 feature and limit the product relies on. It holds no protocol logic and no connection policy (client
//! ids, keep-alive, Receive Maximum are the caller's), and it never logs payloads or keys.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod probe;
pub mod tls;
mod url;

use rumqttc::v5::mqttbytes::v5::{
    Filter, Publish, PublishProperties, RetainForwardRule, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError};
use sealed_ota_protocol::{Action, Inbound, Outbound, Properties};

pub use url::{BrokerUrl, UrlError};

/// Every message of the protocol travels at QoS 1: delivery is confirmed end to end by signed
/// receipts, QoS 1 only spares a retransmission round on a flaky link.
pub const QOS: QoS = QoS::AtLeastOnce;

/// Most QoS 1 publishes the manager keeps in flight on its connection (fewer when the broker's
/// Receive Maximum is lower). rumqttc sizes its outgoing slots for this many when the session is
/// created, about 217 bytes each: unset, it sized them for the protocol's 65,535 (14 MiB of every
/// replica's idle memory, docs/scale.md). 4,096 is what the rmqtt cluster of the scale runs grants
/// (`max_inflight`), far above what 100,000 devices kept in flight (Mosquitto grants 20).
pub const MANAGER_OUTGOING_INFLIGHT: u16 = 4096;

/// The MQTT 5 publish properties the protocol sets (everything else stays unset).
pub fn publish_properties(p: &Properties) -> PublishProperties {
    PublishProperties {
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone().map(Into::into),
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
        ..PublishProperties::default()
    }
}

/// The protocol's view of received publish properties (what a broker may have changed is only a
/// hint to the protocol, which authenticates what matters).
pub fn properties_from(p: Option<&PublishProperties>) -> Properties {
    p.map(|p| Properties {
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|d| d.to_vec()),
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
    })
    .unwrap_or_default()
}

/// A received PUBLISH as the protocol sees it. The payload is copied once (the session owns it).
pub fn inbound_from(publish: &Publish) -> Inbound {
    Inbound {
        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
        payload: publish.payload.to_vec(),
        properties: properties_from(publish.properties.as_ref()),
    }
}

/// Publish one protocol message at QoS 1.
pub async fn publish(client: &AsyncClient, out: Outbound) -> Result<(), ClientError> {
    let properties = publish_properties(&out.properties);
    client
        .publish_with_properties(out.topic, QOS, out.retain, out.payload, properties)
        .await
}

/// Carry out a protocol session's actions in order (QoS 1 always). The client's request channel
/// is drained by its event loop task, so awaiting here cannot deadlock while that task runs.
pub async fn perform(client: &AsyncClient, actions: Vec<Action>) -> Result<(), ClientError> {
    for action in actions {
        match action {
            Action::Publish(out) => publish(client, out).await?,
            Action::Subscribe(filters) => {
                let filters: Vec<Filter> =
                    filters.into_iter().map(|f| Filter::new(f, QOS)).collect();
                if !filters.is_empty() {
                    client.subscribe_many(filters).await?;
                }
            }
            Action::Unsubscribe(filters) => {
                for filter in filters {
                    client.unsubscribe(filter).await?;
                }
            }
        }
    }
    Ok(())
}

/// The reason codes of the filters a SUBACK refused (empty: every filter is in place). A broker
/// may refuse a filter for a passing reason (a clustered broker under load answers
/// `Unspecified` when its replicated routing table did not take the filter in time); the
/// client must subscribe again, or it silently never receives that filter's messages.
pub fn refused(suback: &SubAck) -> Vec<SubscribeReasonCode> {
    suback
        .return_codes
        .iter()
        .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
        .copied()
        .collect()
}

/// Subscribe `filters` again after a refusal, in one SUBSCRIBE: the filters already in place
/// stay as they are and send no retained message twice (MQTT 5 Retain Handling 1, "only for a
/// new subscription"); the refused ones get theirs.
pub async fn resubscribe(client: &AsyncClient, filters: &[String]) -> Result<(), ClientError> {
    if filters.is_empty() {
        return Ok(());
    }
    client.subscribe_many(resubscription(filters)).await
}

/// The filters of [`resubscribe`].
fn resubscription(filters: &[String]) -> Vec<Filter> {
    filters
        .iter()
        .map(|f| Filter {
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
            ..Filter::new(f.clone(), QOS)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_through_rumqttc() {
        let p = Properties {
            response_topic: Some("iot/m/d/ready".into()),
            correlation_data: Some(vec![9, 8]),
            user_properties: vec![("sealed-ota-version".into(), "1".into())],
            content_type: Some("application/cbor".into()),
        };
        assert_eq!(properties_from(Some(&publish_properties(&p))), p);
        assert_eq!(properties_from(None), Properties::default());
    }

    #[test]
    fn a_publish_becomes_an_inbound_message() {
        let mut publish = Publish::new("iot/m/d/notify", QOS, vec![1, 2, 3], None);
        publish.properties = Some(PublishProperties {
            correlation_data: Some(vec![7u8].into()),
            message_expiry_interval: Some(5),
            ..PublishProperties::default()
        });
        let inbound = inbound_from(&publish);
        assert_eq!(inbound.topic, "iot/m/d/notify");
        assert_eq!(inbound.payload, [1, 2, 3]);
        assert_eq!(inbound.properties.correlation_data, Some(vec![7]));
        assert_eq!(inbound.properties.response_topic, None);
    }

    #[test]
    fn a_suback_refusal_is_read_per_filter() {
        let suback = SubAck {
            pkid: 4,
            return_codes: vec![
                SubscribeReasonCode::Success(QOS),
                SubscribeReasonCode::Unspecified,
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::QuotaExceeded,
            ],
            properties: None,
        };
        assert_eq!(
            refused(&suback),
            vec![
                SubscribeReasonCode::Unspecified,
                SubscribeReasonCode::QuotaExceeded
            ]
        );
        let all_in = SubAck {
            return_codes: vec![SubscribeReasonCode::Success(QOS)],
            ..suback
        };
        assert!(refused(&all_in).is_empty());
    }

    #[test]
    fn a_resubscription_asks_retained_messages_only_for_new_filters() {
        let filters = resubscription(&["a/b".to_owned(), "c/+".to_owned()]);
        assert_eq!(filters.len(), 2);
        assert!(filters
            .iter()
            .all(|f| f.retain_forward_rule == RetainForwardRule::OnNewSubscribe && f.qos == QOS));
        assert_eq!(filters[1].path, "c/+");
    }
}
