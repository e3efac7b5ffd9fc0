package wireguard

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// loadOrCreateKey returns the private key kept in path, generating and
// writing one when the file does not exist. The file holds the key as
// upstream writes it: base64, no newline, mode 0400. Surrounding white
// space is accepted on read. The error names the file, never the key.
func loadOrCreateKey(path string) (wgtypes.Key, bool, error) {
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		k, perr := wgtypes.ParseKey(strings.TrimSpace(string(data)))
		if perr != nil {
			return wgtypes.Key{}, false, fmt.Errorf("key file %s: not a base64 WireGuard private key (delete it to make a new key)", path)
		}
		return k, false, nil
	case !errors.Is(err, fs.ErrNotExist):
		return wgtypes.Key{}, false, fmt.Errorf("read key file: %w", err)
	}
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("generate private key: %w", err)
	}
	if err := writeKeyFile(path, k); err != nil {
		return wgtypes.Key{}, false, err
	}
	return k, true, nil
}

// writeKeyFile writes k to path atomically (a temporary file renamed over
// it), so a crash never leaves a truncated key that a restart would reject.
func writeKeyFile(path string, k wgtypes.Key) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("key file directory: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write key file %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename it is gone already
	_, werr := f.WriteString(k.String())
	err = errors.Join(werr, f.Chmod(0o400), f.Sync(), f.Close())
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("write key file %s: %w", path, err)
	}
	return nil
}

// BackendData is what a wireguard node publishes in BackendData (IPv4) and
// BackendV6Data (IPv6), byte-compatible with upstream:
// {"PublicKey":"<base64>","Port":51820}.
type BackendData struct {
	PublicKey string
	// Port is the UDP port peers send to over this family. Upstream
	// before v0.26.6 published no port: zero means the reader's own
	// listen port.
	Port uint16
}

// marshalBackendData renders the data for one family.
func marshalBackendData(pub wgtypes.Key, port int) (json.RawMessage, error) {
	return json.Marshal(BackendData{PublicKey: pub.String(), Port: uint16(port)})
}

// peerKey is a peer's published key and port for one family.
type peerKey struct {
	key  wgtypes.Key
	port int
}

// parseBackendData reads a peer's BackendData or BackendV6Data.
func parseBackendData(raw json.RawMessage) (peerKey, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return peerKey{}, errors.New("no wireguard backend data (no public key)")
	}
	var d BackendData
	if err := json.Unmarshal(raw, &d); err != nil {
		return peerKey{}, fmt.Errorf("wireguard backend data: %v", err)
	}
	if d.PublicKey == "" {
		return peerKey{}, errors.New("wireguard backend data: no PublicKey")
	}
	k, err := wgtypes.ParseKey(d.PublicKey)
	if err != nil {
		return peerKey{}, fmt.Errorf("wireguard backend data: PublicKey %q is not base64 of 32 bytes", d.PublicKey)
	}
	return peerKey{key: k, port: int(d.Port)}, nil
}
