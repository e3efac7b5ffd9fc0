package etcdstore

// SetListPage makes s list n keys per request and call afterPage (when
// not nil) between its requests.
func SetListPage(s *Store, n int, afterPage func()) { s.listPage, s.afterPage = n, afterPage }
