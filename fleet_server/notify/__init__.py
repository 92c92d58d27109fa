"""Webhook notifications: the ``notifications:`` receivers of ``server.yaml`` (:mod:`.config`), the
event names (:mod:`.events`), the signed request (:mod:`.signing`), one HTTP POST (:mod:`.sender`),
what the server's parts report turned into events (:mod:`.sources`), and the :class:`Notifier` that
enqueues each event with one insert and delivers it from its own thread (:mod:`.notifier`).

The parts are imported from their modules (this package imports none, so that the server's
configuration can read :mod:`.config` without the store). Described for operators and receivers in
``docs/notifications.md``.
"""

