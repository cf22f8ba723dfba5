#!/bin/sh
# TEST SCAFFOLDING: the official redis image's entrypoint: options alone mean redis-server, root
# drops to the redis user, and protected mode is off as in the image's own build of Redis.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec gosu redis "$0" "$@"
fi
if [ "$1" = 'redis-server' ]; then
    set -- "$@" --protected-mode no
fi
exec "$@"
