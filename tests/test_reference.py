"""The `reference` implementation passes the shared battery."""

import battery


class TestReference(battery.GNABattery):
    implementation = "reference"
