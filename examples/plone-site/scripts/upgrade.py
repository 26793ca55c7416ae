"""Run the pending GenericSetup upgrade steps of the Plone site, then commit.

    bin/client1 run scripts/upgrade.py [site_id]

First the Plone core migration (portal_migration, the Products.CMFPlone:plone
profile), then every other installed profile that has pending upgrade steps
(portal_setup). Prints "no pending upgrades" when there is nothing to do.
Exit status 1 when the site is missing, 2 when upgrades remain pending.
`app` is given by `bin/client<n> run`.
"""

import os
import sys

import transaction
from AccessControl.SecurityManagement import newSecurityManager
from AccessControl.SpecialUsers import system
from Testing.makerequest import makerequest
from zope.component.hooks import setSite
from zope.globalrequest import setRequest

# bin/client<n> run makes sys.argv [interpreter, "-c", script, args...]
ARGS = sys.argv[sys.argv.index("-c") + 2 :] if "-c" in sys.argv else sys.argv[1:]
SITE_ID = ARGS[0] if ARGS else os.environ.get("PLONE_SITE_ID", "Plone")
CORE_PROFILE = "Products.CMFPlone:plone"


def pending(setup):
    """{profile_id: [upgrade step info]} of the installed profiles with pending steps."""
    found = {}
    for profile_id in setup.listProfilesWithUpgrades():
        if (
            not setup.getLastVersionForProfile(profile_id)
            or setup.getLastVersionForProfile(profile_id) == "unknown"
        ):
            continue  # not installed
        steps = setup.listUpgrades(profile_id)
        if steps:
            found[profile_id] = steps
    return found


def main(app):
    app = makerequest(app)
    setRequest(app.REQUEST)
    newSecurityManager(None, system)
    site = app.get(SITE_ID)
    if site is None:
        print(f"upgrade: no site /{SITE_ID}")
        return 1
    setSite(site)
    setup = site.portal_setup
    done = []

    migration = site.portal_migration
    if migration.needUpgrading():
        print(
            f"upgrade: Plone {migration.getInstanceVersion()} -> {migration.getFileSystemVersion()}"
        )
        migration.upgrade(swallow_errors=False)
        done.append(CORE_PROFILE)

    for profile_id, steps in sorted(pending(setup).items()):
        if profile_id == CORE_PROFILE:
            continue
        print(f"upgrade: {profile_id}: {len(steps)} step(s)")
        setup.upgradeProfile(profile_id)
        done.append(profile_id)

    left = pending(setup)
    if not done:
        print("upgrade: no pending upgrades")
        return 0
    transaction.get().note("upgrade.py: " + " ".join(done))
    transaction.commit()
    print(f"upgrade: upgraded {' '.join(done)}; still pending: {' '.join(left) or 'none'}")
    return 2 if left else 0


sys.exit(main(app))  # noqa: F821 (app is given by bin/client<n> run)
