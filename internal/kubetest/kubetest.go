// Package kubetest runs a real kube-apiserver (built from k8s.io/kubernetes
// by hack/test.sh, see tools/) for tests and the cluster demo: backed by an
// embedded etcd (internal/etcdtest), on loopback with random ports, TLS with
// a generated CA, static token authentication, RBAC authorization,
// --endpoint-reconciler-type=none, and a service-account signing key
// generated per server. Tests get an admin client (group system:masters)
// and restricted identities: any user by impersonation, or a
// ServiceAccount's own token.
//
// The server can be stopped and started again on the same port and data.
// It is a harness, not a way to run a cluster: no controller manager, no
// scheduler, no kubelet.
package kubetest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/testenv"
)

// EnvBinary names the environment variable that overrides where the
// kube-apiserver binary is found.
const EnvBinary = "FLANNEL_KUBE_APISERVER"

// AdminUser is the identity of the admin token (group system:masters).
const AdminUser = "kubetest-admin"

// Binary returns the kube-apiserver to run: $FLANNEL_KUBE_APISERVER when
// set, else .cache/bin/kube-apiserver at the root of this repository (where
// hack/test.sh builds it), and whether it exists.
func Binary() (string, bool) { return Tool("kube-apiserver", EnvBinary) }

// Tool is testenv.Tool.
func Tool(name, env string) (string, bool) { return testenv.Tool(name, env) }

// Options configure a Server. Every field is optional.
type Options struct {
	// Binary is the kube-apiserver to run. Default: Binary().
	Binary string
	// Dir holds the server's files (certificates, keys, token file, log).
	// Default a new temporary directory removed by Close.
	Dir string
	// ExtraArgs are appended to the command line.
	ExtraArgs []string
	// StartTimeout bounds how long a start waits for /readyz. Default 120s.
	StartTimeout time.Duration
	// Address is where the server listens and what it advertises
	// (default 127.0.0.1); the server certificate covers it.
	Address net.IP
	// CertIPs are more addresses the server certificate covers (the
	// kubernetes Service's ClusterIP, for pods that use it).
	CertIPs []net.IP
}

// Server is a running kube-apiserver with its etcd. Its methods are safe
// for concurrent use.
type Server struct {
	// URL is the https address of the apiserver.
	URL string
	// CAFile is the CA of its serving certificate.
	CAFile string
	// Dir holds the server's files; LogFile its stdout and stderr.
	Dir, LogFile string

	etcd       *etcdtest.Server
	opts       Options
	removeDir  bool
	args       []string
	adminToken string
	// SAKeyFile is the service-account signing key (for a controller
	// manager's --service-account-private-key-file).
	SAKeyFile string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// New starts an etcd and a kube-apiserver and waits until /readyz
// answers. On error nothing is left running.
func New(opts Options) (_ *Server, err error) {
	if opts.Binary == "" {
		p, ok := Binary()
		if !ok {
			return nil, fmt.Errorf("kube-apiserver binary %q not found (build it with hack/test.sh or set %s)", p, EnvBinary)
		}
		opts.Binary = p
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 120 * time.Second
	}
	s := &Server{opts: opts, Dir: opts.Dir}
	if s.Dir == "" {
		if s.Dir, err = os.MkdirTemp("", "kubetest-"); err != nil {
			return nil, fmt.Errorf("create kube-apiserver dir: %w", err)
		}
		s.removeDir = true
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	s.etcd, err = etcdtest.New(etcdtest.Options{Dir: filepath.Join(s.Dir, "etcd")})
	if err != nil {
		return nil, err
	}
	addr := net.IPv4(127, 0, 0, 1)
	if opts.Address != nil {
		addr = opts.Address
	}
	certs, err := etcdtest.WriteCertsFor(filepath.Join(s.Dir, "pki"), append([]net.IP{addr}, opts.CertIPs...)...)
	if err != nil {
		return nil, err
	}
	s.CAFile = certs.CAFile
	saKey := filepath.Join(s.Dir, "pki", "sa.key")
	s.SAKeyFile = saKey
	if err := writeECKey(saKey); err != nil {
		return nil, err
	}
	s.adminToken = randomHex(16)
	tokens := filepath.Join(s.Dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(fmt.Sprintf("%s,%s,%s,\"system:masters\"\n", s.adminToken, AdminUser, AdminUser)), 0o600); err != nil {
		return nil, fmt.Errorf("write token file: %w", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s.URL = "https://" + net.JoinHostPort(addr.String(), strconv.Itoa(port))
	s.LogFile = filepath.Join(s.Dir, "kube-apiserver.log")
	s.args = append([]string{
		"--etcd-servers=" + strings.Join(s.etcd.Endpoints, ","),
		"--bind-address=" + addr.String(),
		"--advertise-address=" + addr.String(),
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + certs.ServerCertFile,
		"--tls-private-key-file=" + certs.ServerKeyFile,
		"--client-ca-file=" + certs.CAFile,
		"--token-auth-file=" + tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubetest.invalid",
		"--service-account-key-file=" + saKey,
		"--service-account-signing-key-file=" + saKey,
		"--api-audiences=https://kubetest.invalid",
		"--service-cluster-ip-range=10.96.0.0/24",
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + filepath.Join(s.Dir, "certs"),
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=0",
	}, opts.ExtraArgs...)
	if err := s.Start(); err != nil {
		return nil, err
	}
	return s, nil
}

// Start starts the kube-apiserver (after Stop) and waits for /readyz.
// Starting a running server does nothing.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return nil
	}
	logf, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open kube-apiserver log: %w", err)
	}
	cmd := exec.Command(s.opts.Binary, s.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start kube-apiserver %s: %w", s.opts.Binary, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		logf.Close()
		close(done)
	}()
	s.cmd, s.done = cmd, done
	if err := s.waitReady(done); err != nil {
		s.stopLocked()
		return fmt.Errorf("kube-apiserver (log %s): %w: %s", s.LogFile, err, tail(s.LogFile))
	}
	return nil
}

func (s *Server) waitReady(exited <-chan struct{}) error {
	cs, err := kubernetes.NewForConfig(s.AdminConfig())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.StartTimeout)
	defer cancel()
	var last error
	for {
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		rcancel()
		if err == nil {
			return nil
		}
		last = err
		select {
		case <-exited:
			return errors.New("exited before ready")
		case <-ctx.Done():
			return fmt.Errorf("not ready after %s: %w", s.opts.StartTimeout, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Stop stops the kube-apiserver (etcd keeps running and its data stays).
// Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

func (s *Server) stopLocked() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second): // graceful shutdown can take long
		s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd, s.done = nil, nil
}

// Close stops the apiserver and etcd and removes Dir when New created it.
// It is safe to call more than once.
func (s *Server) Close() error {
	s.Stop()
	var errs []error
	if s.etcd != nil {
		errs = append(errs, s.etcd.Close())
	}
	if s.removeDir {
		errs = append(errs, os.RemoveAll(s.Dir))
	}
	return errors.Join(errs...)
}

// AdminToken is the admin identity's bearer token (group system:masters).
func (s *Server) AdminToken() string { return s.adminToken }

// AdminConfig returns a client configuration of the admin identity. Its
// QPS limits are raised for tests.
func (s *Server) AdminConfig() *rest.Config {
	return s.TokenConfig(s.adminToken)
}

// TokenConfig returns a client configuration authenticating with token.
func (s *Server) TokenConfig(token string) *rest.Config {
	return &rest.Config{
		Host:            s.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: s.CAFile},
		QPS:             1000,
		Burst:           2000,
		Timeout:         30 * time.Second,
	}
}

// ImpersonateConfig returns the admin configuration impersonating user in
// groups: a restricted identity with whatever RBAC grants it.
func (s *Server) ImpersonateConfig(user string, groups ...string) *rest.Config {
	c := s.AdminConfig()
	c.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: append([]string{"system:authenticated"}, groups...)}
	return c
}

func writeECKey(path string) error {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate service account key: %w", err)
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return fmt.Errorf("marshal service account key: %w", err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return fmt.Errorf("write service account key: %w", err)
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// tail returns the last lines of a log file for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}
