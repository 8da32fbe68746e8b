"""The fixed fact tables behind the demo preference data (`demo_pairs.py`): capitals, definitions, units.

Only well-known, checkable facts. Country names carry their article ("the Netherlands"); a capital's
`confusion` is the city a model is likely to give instead (its largest city), or "" (then another capital is
used). Country names never contain their capital's name, so a wrong reply that names the country is not
scored correct.
"""

from __future__ import annotations

# (country as written in a sentence, capital, a plausible wrong city or "")
CAPITALS = (
    ("France", "Paris", "Lyon"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"), ("Portugal", "Lisbon", "Porto"), ("the United Kingdom", "London", "Manchester"),
    ("Ireland", "Dublin", "Cork"), ("the Netherlands", "Amsterdam", "Rotterdam"), ("Belgium", "Brussels", "Antwerp"),
    ("Switzerland", "Bern", "Zurich"), ("Austria", "Vienna", "Salzburg"), ("Poland", "Warsaw", "Krakow"),
    ("the Czech Republic", "Prague", "Brno"), ("Hungary", "Budapest", ""), ("Greece", "Athens", "Thessaloniki"),
    ("Sweden", "Stockholm", "Gothenburg"), ("Norway", "Oslo", "Bergen"), ("Denmark", "Copenhagen", "Aarhus"),
    ("Finland", "Helsinki", ""), ("Iceland", "Reykjavik", ""), ("Russia", "Moscow", "Saint Petersburg"),
    ("Ukraine", "Kyiv", "Odesa"), ("Romania", "Bucharest", ""), ("Bulgaria", "Sofia", ""),
    ("Serbia", "Belgrade", ""), ("Croatia", "Zagreb", "Split"), ("Turkey", "Ankara", "Istanbul"),
    ("Egypt", "Cairo", "Alexandria"), ("Morocco", "Rabat", "Casablanca"), ("Nigeria", "Abuja", "Lagos"),
    ("Kenya", "Nairobi", "Mombasa"), ("Ethiopia", "Addis Ababa", ""), ("Ghana", "Accra", ""),
    ("Senegal", "Dakar", ""), ("Algeria", "Algiers", "Oran"), ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"), ("South Korea", "Seoul", "Busan"), ("India", "New Delhi", "Mumbai"),
    ("Pakistan", "Islamabad", "Karachi"), ("Bangladesh", "Dhaka", "Chittagong"), ("Thailand", "Bangkok", ""),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"), ("Indonesia", "Jakarta", "Surabaya"), ("the Philippines", "Manila", ""),
    ("Malaysia", "Kuala Lumpur", ""), ("Iran", "Tehran", "Isfahan"), ("Iraq", "Baghdad", "Basra"),
    ("Saudi Arabia", "Riyadh", "Jeddah"), ("Afghanistan", "Kabul", ""), ("Nepal", "Kathmandu", ""),
    ("Australia", "Canberra", "Sydney"), ("New Zealand", "Wellington", "Auckland"), ("Canada", "Ottawa", "Toronto"),
    ("the United States", "Washington", "New York"), ("Mexico", "Mexico City", "Guadalajara"),
    ("Cuba", "Havana", ""), ("Brazil", "Brasilia", "Rio de Janeiro"), ("Argentina", "Buenos Aires", "Cordoba"),
    ("Chile", "Santiago", "Valparaiso"), ("Peru", "Lima", "Cusco"), ("Colombia", "Bogota", "Medellin"),
    ("Venezuela", "Caracas", ""), ("Uruguay", "Montevideo", ""), ("Jamaica", "Kingston", ""),
)

# (the term with its article, the bare term, the predicate of "<term> is <predicate>.", the key word the
# checker looks for: it occurs in this predicate and in no other).
DEFINITIONS = (
    ("a mammal", "mammal", "a warm-blooded animal that feeds its young with milk", "milk"),
    ("photosynthesis", "photosynthesis", "the process by which plants turn sunlight, water and carbon dioxide "
     "into sugar", "sunlight"),
    ("a noun", "noun", "a word that names a person, place, thing or idea", "names"),
    ("a verb", "verb", "a word that describes an action or a state", "action"),
    ("a prime number", "prime number", "a whole number greater than 1 whose only divisors are 1 and itself",
     "divisors"),
    ("an island", "island", "a piece of land completely surrounded by water", "completely"),
    ("a planet", "planet", "a large body that orbits a star and has cleared its path of other objects", "orbits"),
    ("gravity", "gravity", "the force that pulls objects with mass toward each other", "pulls"),
    ("a volcano", "volcano", "an opening in the earth's crust through which molten rock erupts", "molten"),
    ("a glacier", "glacier", "a large, slowly moving mass of ice on land", "ice"),
    ("democracy", "democracy", "a system of government in which the people choose their leaders by voting",
     "voting"),
    ("a thermometer", "thermometer", "an instrument that measures temperature", "temperature"),
    ("a triangle", "triangle", "a flat shape with three straight sides", "straight"),
    ("evaporation", "evaporation", "the change of a liquid into a gas, usually by heating", "gas"),
    ("a continent", "continent", "one of the seven very large land masses of the earth", "masses"),
    ("an atom", "atom", "the smallest unit of a chemical element", "smallest"),
    ("a herbivore", "herbivore", "an animal that eats only plants", "eats"),
    ("a fraction", "fraction", "a number that represents a part of a whole", "part"),
    ("a synonym", "synonym", "a word that means the same as another word", "same"),
    ("an antonym", "antonym", "a word that means the opposite of another word", "opposite"),
    ("a desert", "desert", "a dry region that receives very little rain", "rain"),
    ("a century", "century", "a period of one hundred years", "hundred"),
    ("an orchestra", "orchestra", "a large group of musicians who play instruments together", "musicians"),
    ("a dictionary", "dictionary", "a book that lists words in alphabetical order with their meanings",
     "alphabetical"),
    ("a vaccine", "vaccine", "a substance that trains the immune system to fight a disease", "immune"),
    ("a peninsula", "peninsula", "a piece of land almost surrounded by water but joined to the mainland",
     "mainland"),
    ("the equator", "equator", "the imaginary line around the middle of the earth, halfway between the poles",
     "poles"),
    ("a compass", "compass", "a tool with a magnetic needle that points north", "magnetic"),
    ("a fossil", "fossil", "the preserved remains or traces of a plant or animal from long ago", "preserved"),
    ("a haiku", "haiku", "a short Japanese poem of three lines with five, seven and five syllables", "syllables"),
    ("a calendar", "calendar", "a chart that shows the days, weeks and months of a year", "chart"),
    ("an algorithm", "algorithm", "a finite list of steps that solves a problem", "steps"),
)

# (larger unit, its plural, smaller unit, its plural, how many smaller units make one larger unit)
UNITS = (
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("centimeter", "centimeters", "millimeter", "millimeters", 10),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("liter", "liters", "milliliter", "milliliters", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
    ("decade", "decades", "year", "years", 10),
)
