// Command sealed-ota-mochi runs mochi-mqtt (github.com/mochi-mqtt/server/v2) for Sealed OTA's
// test bed: a plain listener (anonymous, as the test bed's Mosquitto has one for the tests' spies
// and rogue clients) and a TLS listener that requires a client certificate signed by the test CA
// and takes the certificate's Common Name as the MQTT username, as Mosquitto's
// `require_certificate true` + `use_identity_as_username true` do. Retained messages and sessions
// persist in a bbolt file when -data is given, so a killed broker comes back with what it had
// saved.
//
// One compatibility setting departs from mochi's defaults: NoInheritedPropertiesOnAck. By default
// mochi copies a QoS 1 PUBLISH's properties (User Properties) into its PUBACK and then writes the
// reason code 0x01 ("granted QoS 1", a SUBACK code) into it; MQTT 5 has no PUBACK reason 0x01, so
// rumqttc (the product's client) rejects the packet and drops the connection on every publish that
// carries User Properties. -inherit-ack-properties restores the default (the broker probe shows the
// failure). Everything else is mochi's default, so tests see what a user of mochi sees.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage/bolt"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.etcd.io/bbolt"
)

// identityHook authenticates every client and, on the TLS listener, names it by its
// certificate's Common Name (the certificate was already verified by the TLS handshake).
type identityHook struct {
	mqtt.HookBase
	tlsListener string
}

func (h *identityHook) ID() string { return "sealed-ota-identity" }

func (h *identityHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnectAuthenticate, mqtt.OnACLCheck}, []byte{b})
}

func (h *identityHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	if cl.Net.Listener != h.tlsListener {
		return true
	}
	conn, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return false
	}
	peers := conn.ConnectionState().PeerCertificates
	if len(peers) == 0 {
		return false
	}
	cl.Properties.Username = []byte(peers[0].Subject.CommonName)
	return true
}

func (h *identityHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

func main() {
	plain := flag.String("plain", "", "plain listener address (anonymous), e.g. 127.0.0.1:1883; empty: none")
	secure := flag.String("tls", "", "TLS listener address (client certificates required), e.g. 127.0.0.1:8883")
	caFile := flag.String("ca", "", "CA certificate (PEM) that client certificates must chain to")
	certFile := flag.String("cert", "", "server certificate (PEM)")
	keyFile := flag.String("key", "", "server private key (PEM)")
	data := flag.String("data", "", "bbolt file for retained messages and sessions; empty: memory only")
	inherit := flag.Bool("inherit-ack-properties", false, "mochi's default: copy a PUBLISH's properties into its PUBACK (breaks MQTT 5 clients, see above)")
	version := flag.Bool("version", false, "print the mochi-mqtt version and exit")
	flag.Parse()
	if *version {
		fmt.Println(mqtt.Version)
		return
	}
	if err := run(*plain, *secure, *caFile, *certFile, *keyFile, *data, *inherit); err != nil {
		fmt.Fprintln(os.Stderr, "sealed-ota-mochi:", err)
		os.Exit(1)
	}
}

func run(plain, secure, caFile, certFile, keyFile, data string, inheritAckProperties bool) error {
	if plain == "" && secure == "" {
		return fmt.Errorf("no listener: give -plain and/or -tls")
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	capabilities := mqtt.NewDefaultServerCapabilities()
	capabilities.Compatibilities.NoInheritedPropertiesOnAck = !inheritAckProperties
	server := mqtt.New(&mqtt.Options{Logger: logger, Capabilities: capabilities})
	if err := server.AddHook(&identityHook{tlsListener: "tls"}, nil); err != nil {
		return err
	}
	if data != "" {
		err := server.AddHook(new(bolt.Hook), &bolt.Options{Path: data, Options: &bbolt.Options{Timeout: 0}})
		if err != nil {
			return fmt.Errorf("-data %s: %w", data, err)
		}
	}
	if plain != "" {
		if err := server.AddListener(listeners.NewTCP(listeners.Config{ID: "plain", Address: plain})); err != nil {
			return fmt.Errorf("-plain %s: %w", plain, err)
		}
	}
	if secure != "" {
		config, err := tlsConfig(caFile, certFile, keyFile)
		if err != nil {
			return err
		}
		if err := server.AddListener(listeners.NewTCP(listeners.Config{ID: "tls", Address: secure, TLSConfig: config})); err != nil {
			return fmt.Errorf("-tls %s: %w", secure, err)
		}
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	if err := server.Serve(); err != nil {
		return err
	}
	<-stop
	return server.Close()
}

func tlsConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" || certFile == "" || keyFile == "" {
		return nil, fmt.Errorf("-tls needs -ca, -cert and -key")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("-cert/-key: %w", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("-ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("-ca %s: no PEM certificate in it", caFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    roots,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}
