package etcdstore

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// DefaultDialTimeout is ClientOptions.DialTimeout's default.
const DefaultDialTimeout = 5 * time.Second

// MaxReconnectDelay caps the jittered exponential backoff between attempts
// to reconnect to an endpoint of a client made by NewClient.
const MaxReconnectDelay = 5 * time.Second

// ClientOptions describe how to reach etcd, as upstream flanneld's
// -etcd-* flags do.
type ClientOptions struct {
	// Endpoints are etcd client URLs ("https://10.0.0.1:2379"). Required.
	Endpoints []string
	// CAFile is a PEM bundle of CAs that sign the server certificate. With
	// it alone the client uses TLS, verifies the server, and presents no
	// certificate. Optional: https endpoints without it use the system
	// roots.
	CAFile string
	// CertFile and KeyFile are the client certificate and its key, for
	// servers that require client certificates. Optional, both or neither.
	CertFile, KeyFile string
	// Username and Password authenticate to etcd. Optional. The password
	// never appears in errors or logs.
	Username, Password string
	// DialTimeout bounds the first connection, which NewClient waits for so
	// that a wrong address, certificate or password fails early. Default
	// DefaultDialTimeout.
	DialTimeout time.Duration
	// Logger receives the etcd client's own warnings and errors. Optional:
	// nil discards them.
	Logger *slog.Logger
}

// String describes the options without the password.
func (o ClientOptions) String() string {
	pw := ""
	if o.Password != "" {
		pw = " password=<redacted>"
	}
	return fmt.Sprintf("etcd endpoints=%s ca=%q cert=%q key=%q username=%q%s",
		strings.Join(o.Endpoints, ","), o.CAFile, o.CertFile, o.KeyFile, o.Username, pw)
}

// GoString is String, so that %#v does not print the password either.
func (o ClientOptions) GoString() string { return o.String() }

// LogValue keeps the password out of slog output.
func (o ClientOptions) LogValue() slog.Value { return slog.StringValue(o.String()) }

// NewClient connects to etcd as opts describe and returns the client; the
// caller closes it. It waits up to DialTimeout for a first answer from one
// endpoint, so that misconfiguration is reported here: the error names the
// file that could not be read, the CA that does not sign the server's
// certificate, or the endpoints that did not answer. It never contains the
// password.
func NewClient(opts ClientOptions) (*clientv3.Client, error) {
	if len(opts.Endpoints) == 0 {
		return nil, errors.New("etcd client: no endpoints")
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = DefaultDialTimeout
	}
	tlsCfg, err := opts.tlsConfig()
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg := clientv3.Config{
		Endpoints:   opts.Endpoints,
		DialTimeout: opts.DialTimeout,
		TLS:         tlsCfg,
		Username:    opts.Username,
		Password:    opts.Password,
		Logger:      zap.New(newSlogCore(log.Handler())),
		// gRPC's reconnect backoff grows to two minutes by default, so a
		// node would take that long to notice etcd is back; cap it.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: MaxReconnectDelay},
			MinConnectTimeout: 5 * time.Second,
		})},
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(opts.Endpoints, ","), opts.explain(err))
	}
	ctx, cancel := context.WithTimeout(context.Background(), opts.DialTimeout)
	defer cancel()
	var probeErr error
	for _, ep := range opts.Endpoints {
		if _, probeErr = c.Status(ctx, ep); probeErr == nil {
			return c, nil
		}
	}
	c.Close()
	return nil, fmt.Errorf("etcd client: no endpoint of %s answered: %w", strings.Join(opts.Endpoints, ","), opts.explain(probeErr))
}

// tlsConfig builds the client TLS configuration, or nil for plain HTTP.
func (o ClientOptions) tlsConfig() (*tls.Config, error) {
	secure := o.CAFile != "" || o.CertFile != "" || o.KeyFile != ""
	for _, ep := range o.Endpoints {
		if u, err := url.Parse(ep); err == nil && u.Scheme == "https" {
			secure = true
		}
	}
	if !secure {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.CAFile != "" {
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcd client: read CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd client: CA file %s holds no PEM certificate", o.CAFile)
		}
		cfg.RootCAs = pool
	}
	switch {
	case o.CertFile != "" && o.KeyFile != "":
		cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcd client: load client certificate %s with key %s: %w", o.CertFile, o.KeyFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case o.CertFile != "" || o.KeyFile != "":
		return nil, fmt.Errorf("etcd client: client certificate %q and key %q must be given together", o.CertFile, o.KeyFile)
	}
	return cfg, nil
}

// explain makes a connection error say which TLS file is at fault when the
// handshake failed: gRPC reports it only as text, so a direct TLS handshake
// with the same settings recovers the typed error. It also scrubs the
// password, should any layer ever echo it.
func (o ClientOptions) explain(err error) error {
	if err == nil {
		return nil
	}
	authErr := errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrGRPCAuthFailed)
	if cfg, cerr := o.tlsConfig(); cerr == nil && cfg != nil && !authErr {
		if herr := o.handshake(cfg); herr != nil {
			err = fmt.Errorf("%w (%w)", herr, err)
		}
	}
	if o.Password != "" && strings.Contains(err.Error(), o.Password) {
		return errors.New(strings.ReplaceAll(err.Error(), o.Password, "<redacted>"))
	}
	return err
}

// handshake tries a TLS handshake with the first endpoint and returns what
// is wrong with the certificates, or nil.
func (o ClientOptions) handshake(cfg *tls.Config) error {
	u, err := url.Parse(o.Endpoints[0])
	if err != nil || u.Host == "" {
		return nil
	}
	host, _, err := net.SplitHostPort(u.Host)
	if err != nil {
		return nil
	}
	cfg = cfg.Clone()
	cfg.ServerName = host
	d := &net.Dialer{Timeout: o.DialTimeout}
	conn, err := tls.DialWithDialer(d, "tcp", u.Host, cfg)
	if err == nil {
		// The handshake completes before the server checks a client
		// certificate (TLS 1.3); read to see a rejection.
		conn.SetReadDeadline(time.Now().Add(min(o.DialTimeout, 500*time.Millisecond)))
		_, rerr := conn.Read(make([]byte, 1))
		conn.Close()
		var alert tls.AlertError
		if errors.As(rerr, &alert) || strings.Contains(fmt.Sprint(rerr), "certificate") {
			return fmt.Errorf("server %s rejected the client certificate %q: %w", u.Host, o.CertFile, rerr)
		}
		return nil
	}
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var host509 x509.HostnameError
	ca := o.CAFile
	if ca == "" {
		ca = "the system roots"
	}
	switch {
	case errors.As(err, &unknown):
		return fmt.Errorf("server certificate of %s is not signed by a CA in %s: %w", u.Host, ca, err)
	case errors.As(err, &invalid), errors.As(err, &host509):
		return fmt.Errorf("server certificate of %s is not valid (CA %s): %w", u.Host, ca, err)
	default:
		return fmt.Errorf("tls handshake with %s: %w", u.Host, err)
	}
}
