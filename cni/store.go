package cni

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// The data dir holds one file per container, named by its ID (as
// upstream's plugin names them), with the delegate config ADD rendered. The
// runtime validates container IDs (skel refuses any with a path
// separator), and path checks here keep a hostile ID out of other
// directories even when the plugin is called in-process.

func storePath(dir, containerID string) (string, error) {
	if containerID == "" || containerID == "." || containerID == ".." || strings.ContainsAny(containerID, "/\\\x00") {
		return "", fmt.Errorf("container ID %q: not usable as a file name", containerID)
	}
	return filepath.Join(dir, containerID), nil
}

// saveConf writes data for containerID atomically with mode 0600: a
// concurrent reader sees the old file, the new one or none, never part of
// one, and a failure leaves nothing behind.
func saveConf(dir, containerID string, data []byte) error {
	path, err := storePath(dir, containerID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create data dir %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+containerID+".tmp-*")
	if err != nil {
		return fmt.Errorf("store config for %s: %w", containerID, err)
	}
	tmp := f.Name()
	_, werr := f.Write(data)
	if werr == nil {
		werr = f.Chmod(0o600)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if err := errors.Join(werr, f.Close()); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("store config for %s in %s: %w", containerID, dir, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("store config for %s: %w", containerID, err)
	}
	return nil
}

// loadConf reads the stored config of containerID; a missing one is an
// error wrapping fs.ErrNotExist.
func loadConf(dir, containerID string) ([]byte, string, error) {
	path, err := storePath(dir, containerID)
	if err != nil {
		return nil, "", err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, path, fmt.Errorf("read stored config of %s: %w", containerID, err)
	}
	return b, path, nil
}

// removeConf deletes the stored config; one already gone is no error.
func removeConf(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stored config %s: %w", path, err)
	}
	return nil
}
